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
