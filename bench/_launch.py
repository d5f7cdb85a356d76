"""One `spjax train` run as a subprocess, for the comparison benches: skipped when its
summary.json exists (re-running a bench finishes only what is missing), reported and skipped
when it fails (one broken run must not hide the others)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASE_CONFIG = ROOT / "configs/tiny.yaml"


def spjax_train(name: str, run_dir: Path, overrides: list[str]) -> dict | None:
    """Train `configs/tiny.yaml` + overrides into run_dir; its summary, or None on failure."""
    summary = Path(run_dir) / "summary.json"
    if not summary.exists():
        command = [sys.executable, "-m", "spjax.cli", "train", str(BASE_CONFIG),
                   f"run_dir={run_dir}", *overrides]
        print(f"[{name}] {' '.join(command[3:])}", flush=True)
        done = subprocess.run(command, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if done.returncode != 0:
            print(f"[{name}] FAILED with exit status {done.returncode}; its log is above, its "
                  f"run dir {run_dir}", flush=True)
            return None
    return json.loads(summary.read_text())


def plot_metric(run_dirs: dict[str, Path], key: str, out: Path, title: str) -> None:
    """One line per run of `key` (e.g. 'val_loss' or 'loss') from its metrics.jsonl, to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, run_dir in run_dirs.items():
        path = Path(run_dir) / "metrics.jsonl"
        if not path.exists():
            continue
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            ax.plot(*zip(*points), marker="o" if key.startswith("val") else None,
                    markersize=3, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel(key.replace("_", " "))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    print(f"plot: {out}", flush=True)
