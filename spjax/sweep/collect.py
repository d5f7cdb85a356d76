"""`spjax sweep collect SPEC`: one CSV row per finished point.

Columns: `run`, then one per swept key (named by the key, e.g. `train.steps`), then

    sparsity_method   the point's sparsity.method ('none' for dense)
    target_sparsity   its sparsity.sparsity (0 for dense)
    params            dense parameter count (summary.json `params`)
    avg_params        non-zero parameters averaged over training (`avg_nonzero_params`):
                      the N of 'The Journey Matters'
    nonzero_params    non-zero parameters at the end
    tokens            training tokens seen
    steps             training steps
    flops             training FLOPs the sparsity actually needs (`train_flops`)
    dense_flops       the same run's dense-equivalent training FLOPs
    loss              final validation loss (nats per token)
    run_dir           where the run lives

Unfinished points are listed on stdout and left out of the table.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

from spjax.sweep.runners import display, plan
from spjax.sweep.spec import SweepSpec, format_value

FIXED_COLUMNS = ("sparsity_method", "target_sparsity", "params", "avg_params",
                 "nonzero_params", "tokens", "steps", "flops", "dense_flops", "loss", "run_dir")


def collect(spec: SweepSpec, out: str | Path | None = None) -> tuple[Path, list[dict[str, Any]],
                                                                     list[str]]:
    """Writes the table (default OUT/runs.csv); returns its path, rows and unfinished names."""
    planned = plan(spec)
    keys = spec.axis_keys
    rows, missing = [], []
    for p in planned:
        if p.status.kind != "done":
            missing.append(p.point.name)
            continue
        s = p.status.summary or {}
        sparse = p.config.sparsity
        row: dict[str, Any] = {"run": p.point.name}
        row.update({k: format_value(v) for k, v in p.point.values})
        row.update({
            "sparsity_method": sparse.method,
            "target_sparsity": sparse.sparsity if sparse.enabled else 0.0,
            "params": s.get("params"),
            # Runs without sparsity accounting count every parameter all the time.
            "avg_params": s.get("avg_nonzero_params", s.get("params")),
            "nonzero_params": s.get("nonzero_params", s.get("params")),
            "tokens": s.get("tokens_seen"),
            "steps": s.get("steps"),
            "flops": s.get("train_flops"),
            "dense_flops": s.get("dense_train_flops", s.get("train_flops")),
            "loss": s.get("final_val_loss"),
            "run_dir": display(p.point.run_dir),
        })
        rows.append(row)
    path = Path(out) if out is not None else spec.out / "runs.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["run", *keys, *FIXED_COLUMNS])
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)  # a reader never sees half a table
    return path, rows, missing
