"""Plot `bench/attention.py --json` results: forward+backward speed of block-sparse
attention relative to cuDNN's dense attention measured in the same run, against block
sparsity (0% is the kernel with every causal tile kept), one line per sequence length and
one panel per (head_dim, kernel).

    python bench/plot_attention.py docs/data/attention_h200_d64.json \
        docs/data/attention_h200_d128.json --out docs/img/attention_h200_vs_cudnn.png
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

# the targets: the dense pattern within 15% of cuDNN, >= 5x at 32k and 90% sparsity
DENSE_TARGET, SPARSE_TARGET = 0.87, 5.0
REQUIRED = ("T", "D", "implementation", "sparsity", "dense_vs_cudnn_fb", "speedup_fb")


def load_rows(paths: list[Path]) -> list[dict]:
    rows = []
    for path in paths:
        try:
            found = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            sys.exit(f"{path}: not a bench/attention.py --json file ({e}); rerun the bench "
                     "with --json PATH")
        for row in found:
            missing = [k for k in REQUIRED if row.get(k) is None]
            if missing:
                sys.exit(f"{path}: a row lacks {', '.join(missing)}; rerun the bench with --json")
        rows += found
    if not rows:
        sys.exit("no rows: pass one or more bench/attention.py --json files")
    return rows


def curves(rows: list[dict]) -> dict[tuple[int, str], dict[int, list[tuple[float, float]]]]:
    """(head_dim, kernel) -> T -> [(sparsity, cuDNN time / ours)], the dense pattern at 0."""
    panels: dict = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        line = panels[(r["D"], r["implementation"])][r["T"]]
        line[0.0] = r["dense_vs_cudnn_fb"]
        line[round(r["sparsity"], 2)] = r["speedup_fb"]
    return {key: {t: sorted(line.items()) for t, line in sorted(by_t.items())}
            for key, by_t in sorted(panels.items())}


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: works on headless nodes
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    panels = curves(rows)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, ((head_dim, kernel), by_t) in zip(axes[0], panels.items()):
        for t, points in by_t.items():
            x, y = np.array(points).T
            ax.plot(100 * x, y, marker="o", label=f"T = {t // 1024}k")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.axhline(DENSE_TARGET, color="tab:red", ls=":", lw=1,
                   label=f"dense-pattern target ({DENSE_TARGET}x)")
        ax.axhline(SPARSE_TARGET, color="tab:green", ls=":", lw=1,
                   label=f"32k / 90% target ({SPARSE_TARGET:g}x)")
        ax.set_yscale("log", base=2)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.set_xlabel("block sparsity of the causal tiles (%)")
        ax.set_ylabel("cuDNN time / ours, forward + backward")
        ax.set_title(f"head_dim {head_dim}, {kernel}")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", nargs="+", type=Path, help="bench/attention.py --json files")
    parser.add_argument("--out", type=Path, default=Path("attention_vs_cudnn.png"))
    parser.add_argument("--implementations", default="",
                        help="comma-separated kernels to plot (default: all in the files)")
    args = parser.parse_args(argv)
    rows = load_rows(args.json)
    if args.implementations:
        keep = set(args.implementations.split(","))
        rows = [r for r in rows if r["implementation"] in keep]
        if not rows:
            sys.exit(f"--implementations {args.implementations}: none in the files")
    plot(rows, args.out)


if __name__ == "__main__":
    main()
