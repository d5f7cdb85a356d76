"""The SLURM runner: one job array, one task per unfinished point, `sbatch --wait`.

The batch script is written to OUT/_slurm/array-<time>.sh, so a submission can be read (and
re-submitted by hand). Task i runs point i's `spjax train` under `srun` (one process per task,
joined by jax.distributed when `slurm.ntasks_per_node` > 1, as in launch/spjax.sbatch) and
appends to the point's sweep.log. SLURM's own output per task goes to OUT/_slurm/JOB_TASK.out
(where a task that fails before starting Python says why).

The outcome of each point is read from its run dir, not from SLURM's accounting, which small
clusters often leave off: a point is done when its summary.json reports all its steps.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from spjax.errors import SweepError
from spjax.sweep.runners import (Outcome, Planned, Progress, SweepInterrupted, command,
                                 failure_detail, terminate_on_sigterm)
from spjax.sweep.spec import SweepSpec
from spjax.sweep.status import point_status


def batch_script(spec: SweepSpec, todo: list[Planned], parallel: int, folder: Path) -> str:
    opts = spec.slurm
    throttle = f"%{parallel}" if parallel > 0 else ""
    lines = ["#!/usr/bin/env bash",
             f"# Written by `spjax sweep {spec.path} --runner slurm`: one task per point.",
             f"#SBATCH --job-name=sweep-{spec.name}",
             f"#SBATCH --array=0-{len(todo) - 1}{throttle}",
             f"#SBATCH --output={folder}/%A_%a.out",
             f"#SBATCH --nodes={opts.nodes}",
             f"#SBATCH --ntasks-per-node={opts.ntasks_per_node}",
             # Time to save a checkpoint before a time limit or scancel kills the task.
             "#SBATCH --signal=TERM@120"]
    if opts.partition:
        lines.append(f"#SBATCH --partition={opts.partition}")
    if opts.time:
        lines.append(f"#SBATCH --time={opts.time}")
    if opts.cpus_per_task:
        lines.append(f"#SBATCH --cpus-per-task={opts.cpus_per_task}")
    if opts.gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={opts.gpus_per_node}")
    lines += [f"#SBATCH {arg}" for arg in opts.sbatch_args]
    lines += ["set -euo pipefail", f"cd {shlex.quote(str(Path.cwd()))}",
              'case "$SLURM_ARRAY_TASK_ID" in']
    for i, planned in enumerate(todo):
        cmd = " ".join(shlex.quote(c) for c in command(spec, planned.point))
        lines.append(f"  {i}) LOG={shlex.quote(str(planned.point.log))}; CMD=({cmd}) ;;")
    lines += ['  *) echo "no point for array task $SLURM_ARRAY_TASK_ID" >&2; exit 2 ;;', "esac",
              'echo "=== spjax sweep: slurm job ${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID} on '
              '$(hostname) at $(date \'+%Y-%m-%d %H:%M:%S\'): ${CMD[*]}" >> "$LOG"',
              # --kill-on-bad-exit: one failed process ends the step instead of leaving the
              # others waiting at a collective.
              'srun --kill-on-bad-exit=1 "${CMD[@]}" >> "$LOG" 2>&1', ""]
    return "\n".join(lines)


def run_slurm(spec: SweepSpec, todo: list[Planned], parallel: int, progress: Progress,
              poll_s: float = 1.0) -> list[Outcome]:
    if not shutil.which("sbatch"):
        raise SweepError("sbatch not found: --runner slurm needs the SLURM client tools on "
                         "PATH (and SLURM_CONF if the cluster config is not the default); "
                         "use --runner local to run here")
    folder = spec.out / "_slurm"
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / f"array-{time.strftime('%Y%m%d-%H%M%S')}.sh"
    script.write_text(batch_script(spec, todo, parallel, folder))
    proc = subprocess.Popen(["sbatch", "--parsable", "--wait", str(script)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)
    # --parsable prints the job id as soon as the array is queued, then --wait blocks.
    job_id = (proc.stdout.readline() if proc.stdout else "").strip().split(";")[0]
    if not job_id:
        _, err = proc.communicate()
        why = err.strip().splitlines()[-1] if err.strip() else f"exit {proc.returncode}"
        raise SweepError(f"sbatch refused {script}: {why}")
    print(f"sweep: submitted job array {job_id} ({len(todo)} tasks) from {script}",
          file=progress.out, flush=True)

    state = {p.point.index: "queued" for p in todo}
    # A point has started once its log grows past its size at submission (the task writes a
    # header line first); earlier attempts' lines are already in the log.
    sizes = {p.point.index: _size(p.point.log) for p in todo}
    outcomes: dict[int, Outcome] = {}
    restore = terminate_on_sigterm()
    try:
        while True:
            finished = proc.poll() is not None
            for planned in todo:
                index = planned.point.index
                if state[index] in ("done", "failed"):
                    continue
                status = point_status(planned.point, planned.config)
                if state[index] == "queued" and (status.kind == "done" or
                                               _size(planned.point.log) > sizes[index]):
                    state[index] = "running"
                    progress.started(planned)
                if status.kind == "done":
                    state[index] = "done"
                    outcomes[index] = Outcome(planned.point, "done")
                    progress.finished(planned.point, status.summary)
                elif finished:  # the array is over and this point has no finished summary
                    state[index] = "failed"
                    if _size(planned.point.log) == sizes[index]:
                        with planned.point.log.open("a") as log:
                            log.write(f"spjax sweep: error: the SLURM task never started this "
                                      f"point; see {folder}/{job_id}_{todo.index(planned)}.out\n")
                    detail = failure_detail(planned.point, None)
                    outcomes[index] = Outcome(planned.point, "failed", detail)
                    progress.failed_point(planned.point, detail)
            if finished:
                break
            progress.tick([p for p in todo if state[p.point.index] == "running"])
            time.sleep(poll_s)
    except KeyboardInterrupt:
        # scancel sends SIGTERM first: each running point saves a checkpoint.
        subprocess.run(["scancel", job_id], capture_output=True, timeout=60)
        proc.wait(timeout=120)
        raise SweepInterrupted(f"sweep interrupted; job {job_id} cancelled (running points "
                               f"saved checkpoints); run the same command again to resume") \
            from None
    finally:
        restore()
    err = proc.stderr.read() if proc.stderr else ""
    if err.strip() and any(o.result == "failed" for o in outcomes.values()):
        print(f"sweep: sbatch: {err.strip().splitlines()[-1]}", file=sys.stderr, flush=True)
    return [outcomes[p.point.index] for p in todo]


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0
