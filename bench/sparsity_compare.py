"""Sparse training methods against dense at equal steps, and GMP's prune-window comparison of
'The Journey Matters': final validation loss, non-zero parameters at the end and on average
over training, and training FLOPs vs dense.

Each method is a real `spjax train` run (subprocess) in RUN_ROOT/<name>; re-running skips runs
whose summary.json exists. Without --data the runs use the built-in default data.

    python bench/sparsity_compare.py --model tiny --steps 300 --run-root runs/sparse_tiny
    python bench/sparsity_compare.py --model 60m --data DATASET --steps 2000 --batch 64 \
        --seq-len 512 --run-root runs/sparse60m model.compute_dtype=bfloat16
"""

from __future__ import annotations

import argparse
from pathlib import Path

from _launch import plot_metric, spjax_train  # bench/ is the script's directory, so on sys.path


def runs(steps: int) -> dict[str, list[str]]:
    """name -> overrides. 75% sparsity (50% for 2:4); mask updates spaced for the run length
    (the presets' every-100-steps would give a short run only a couple of updates)."""
    every = max(1, steps // 30)
    gmp = ["sparsity=gmp", "sparsity.sparsity=0.75", f"sparsity.gmp.update_every={every}"]
    return {
        "dense": [],
        "static": ["sparsity=static", "sparsity.sparsity=0.75"],
        "gmp 25-75%": [*gmp, "sparsity.gmp.start_fraction=0.25", "sparsity.gmp.end_fraction=0.75"],
        "rigl": ["sparsity=rigl", "sparsity.sparsity=0.75",
                 f"sparsity.rigl.update_every={max(1, steps // 12)}"],
        "srste 2:4": ["sparsity=srste_2of4"],
        "gmp 0-50%": [*gmp, "sparsity.gmp.start_fraction=0.0", "sparsity.gmp.end_fraction=0.5"],
        "gmp 50-100%": [*gmp, "sparsity.gmp.start_fraction=0.5", "sparsity.gmp.end_fraction=1.0"],
    }


def run_dir_of(name: str, args: argparse.Namespace) -> Path:
    return Path(args.run_root) / name.replace(" ", "_").replace("%", "").replace(":", "of")


def run_one(name: str, overrides: list[str], args: argparse.Namespace) -> dict | None:
    run_dir = run_dir_of(name, args)
    command = [f"model={args.model}", f"train.steps={args.steps}",
               f"train.eval_every={max(1, args.steps // 4)}",
               f"train.checkpoint_every={args.steps}", "train.progress=false"]
    if args.data:
        command += [f"data.path={args.data}", "model.vocab_size=0"]
    if args.batch:
        command.append(f"data.batch_size={args.batch}")
    if args.seq_len:
        command.append(f"data.seq_len={args.seq_len}")
    return spjax_train(name, run_dir, [*command, *overrides, *args.overrides])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--data", default="", help="prepared dataset (default: built-in data)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=0, help="default: the config's")
    parser.add_argument("--seq-len", type=int, default=0, help="default: the config's")
    parser.add_argument("--run-root", default="runs/sparsity_compare")
    parser.add_argument("--only", default="", help="comma-separated subset of the run names")
    parser.add_argument("--plot", default="", help="also draw the validation curves to this PNG")
    parser.add_argument("overrides", nargs="*", help="extra config overrides for every run")
    args = parser.parse_args()

    table = runs(args.steps)
    names = args.only.split(",") if args.only else list(table)
    rows = [(name, run_one(name, table[name], args)) for name in names]
    failed = [name for name, s in rows if s is None]
    rows = [(name, s) for name, s in rows if s is not None]
    dense = next((s for n, s in rows if n == "dense"), None)
    print(f"\n{args.model}, {args.steps} steps, data {args.data or 'built-in default'}")
    print("| run | final val loss | vs dense | non-zero params (end) | average non-zero params | "
          "train FLOPs vs dense |")
    print("|---|---|---|---|---|---|")
    for name, s in rows:
        delta = f"{s['final_val_loss'] - dense['final_val_loss']:+.4f}" if dense else ""
        print(f"| {name} | {s['final_val_loss']:.4f} | {delta} | {s['nonzero_params'] / 1e6:.3f}M"
              f" | {s['avg_nonzero_params'] / 1e6:.3f}M | {s['train_flops_vs_dense']:.2f} |")
    for name in failed:
        print(f"| {name} | failed: see its log above | | | | |")

    if args.plot:
        plot_metric({name: run_dir_of(name, args) for name, _ in rows}, "val_loss",
                    Path(args.plot), f"{args.model}: validation loss, sparse methods vs dense")


if __name__ == "__main__":
    main()
