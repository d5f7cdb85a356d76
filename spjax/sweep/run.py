"""`run_sweep(spec, runner, parallel)`: plan a sweep's points, hand the unfinished ones to the
local runner (runners.py) or the SLURM runner (slurm.py), and report every point."""

from __future__ import annotations

import sys
from typing import TextIO

from spjax.sweep.runners import Outcome, Progress, describe, display, plan, report, run_local
from spjax.sweep.slurm import run_slurm
from spjax.sweep.spec import SweepSpec
from spjax.sweep.status import write_marker


def run_sweep(spec: SweepSpec, runner: str = "local", parallel: int = 1,
              out: TextIO | None = None, progress_every: float = 30.0, gpus: int = 0) -> int:
    out = out or sys.stdout
    planned = plan(spec)
    print(f"sweep {spec.name}: {describe(planned)}; run dirs under {display(spec.out)}",
          file=out, flush=True)
    todo = [p for p in planned if p.status.kind != "done"]
    outcomes = [Outcome(p.point, "skipped") for p in planned if p.status.kind == "done"]
    for p in todo:
        write_marker(p.point, p.config, spec.path)
    progress = Progress(len(planned), len(outcomes), out, progress_every)
    if todo:
        if runner == "local":
            outcomes += run_local(spec, todo, parallel, progress, gpus=gpus)
        else:
            outcomes += run_slurm(spec, todo, parallel, progress)
    order = {p.point.index: i for i, p in enumerate(planned)}
    outcomes.sort(key=lambda o: order[o.point.index])
    return report(outcomes, out)
