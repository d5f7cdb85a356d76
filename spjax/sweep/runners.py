"""Running a sweep's points: plan them, run the unfinished ones locally, report each one.

`run_sweep` (run.py) loads every point's config first, so a typo in any key
fails at start-up with the config's own message, before anything trains. Finished points are
skipped without starting a process; interrupted ones are re-run with the same command, which
resumes from their last checkpoint. Each attempt appends to RUN_DIR/sweep.log. A failed point
is reported with its log path and never stops the others; the sweep then exits non-zero.

The local runner here keeps up to N `spjax train` processes running at once; the SLURM runner
(slurm.py) submits one job array with one task per unfinished point.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Literal, TextIO

from spjax.config import Config
from spjax.errors import SpjaxError, SweepError
from spjax.sweep.spec import Point, SweepSpec
from spjax.sweep.status import Status, check_marker, last_step, point_status


class SweepInterrupted(SpjaxError):
    """The sweep was stopped by a signal; running points saved checkpoints."""


@dataclasses.dataclass
class Planned:
    point: Point
    config: Config
    status: Status


@dataclasses.dataclass
class Outcome:
    point: Point
    result: Literal["skipped", "done", "failed"]
    detail: str = ""  # for failures: exit status and the last line of the log


def plan(spec: SweepSpec) -> list[Planned]:
    """Every point with its validated config and current status (reads files only)."""
    planned = []
    for point in spec.points():
        config = spec.point_config(point)
        check_marker(point, config)
        planned.append(Planned(point, config, point_status(point, config)))
    return planned


def describe(planned: list[Planned]) -> str:
    done = sum(p.status.kind == "done" for p in planned)
    partial = [p for p in planned if p.status.kind == "partial"]
    pending = sum(p.status.kind == "pending" for p in planned)
    return (f"{len(planned)} points: {done} finished (skipped), {len(partial)} to resume, "
            f"{pending} to start")


def command(spec: SweepSpec, point: Point) -> list[str]:
    return [sys.executable, "-m", "spjax.cli", "train", str(spec.base), *point.train_args()]


def display(path: Path) -> str:
    """A path relative to the cwd when it lies below it (shorter progress lines)."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def failure_detail(point: Point, code: int | None) -> str:
    """'exit 2: spjax: error: ...': the status and the log's last line that says why."""
    lines: list[str] = []
    try:
        lines = [ln.strip() for ln in point.log.read_text(errors="replace").splitlines()
                 if ln.strip() and not ln.startswith("=== spjax sweep")]
    except OSError:
        pass
    # spjax's own one-line error says why; launchers' lines (srun: error: task 0 exited...)
    # only say that it failed.
    reason = next((ln for ln in reversed(lines) if ln.startswith("spjax: error:")), None) or \
        next((ln for ln in reversed(lines) if "error" in ln.lower()),
             lines[-1] if lines else "no output")
    status = f"exit {code}" if code is not None else "no finished summary"
    return f"{status}: {reason[:300]}"


class Progress:
    """Prints one line per event (start, finish, failure) with the sweep's counts, and every
    `every` seconds the last logged step of each running point."""

    def __init__(self, total: int, done: int, out: TextIO, every: float):
        self.total, self.done, self.failed, self.running = total, done, 0, 0
        self.out, self.every = out, every
        self._last_status = time.time()

    def _counts(self) -> str:
        return (f"{self.done}/{self.total} done, {self.running} running, {self.failed} failed")

    def line(self, text: str) -> None:
        print(f"sweep [{self._counts()}] {text}", file=self.out, flush=True)

    def started(self, planned: Planned) -> None:
        self.running += 1
        resume = (f" (resuming from step {planned.status.step})"
                  if planned.status.kind == "partial" else "")
        self.line(f"started {planned.point.name}{resume}; log {display(planned.point.log)}")

    def finished(self, point: Point, summary: dict | None) -> None:
        self.running -= 1
        self.done += 1
        loss = summary.get("final_val_loss") if summary else None
        wall = summary.get("wall_time_s") if summary else None
        about = (f": val loss {loss:.4f} in {wall:.0f} s"
                 if isinstance(loss, float) and isinstance(wall, (int, float)) else "")
        self.line(f"finished {point.name}{about}")

    def failed_point(self, point: Point, detail: str) -> None:
        self.running -= 1
        self.failed += 1
        self.line(f"FAILED {point.name} ({detail}); log {display(point.log)}")

    def tick(self, running: list[Planned]) -> None:
        if not running or time.time() - self._last_status < self.every:
            return
        self._last_status = time.time()
        parts = []
        for p in running:
            step = last_step(p.point.run_dir)
            where = f"step {step}/{p.config.train.steps}" if step is not None else "starting"
            parts.append(f"{p.point.name} {where}")
        self.line("; ".join(parts))


def report(outcomes: list[Outcome], out: TextIO) -> int:
    """Final summary; the exit status is 1 when any point failed."""
    failed = [o for o in outcomes if o.result == "failed"]
    ran = sum(o.result == "done" for o in outcomes)
    skipped = sum(o.result == "skipped" for o in outcomes)
    print(f"sweep: {ran} trained, {skipped} already finished, {len(failed)} failed",
          file=out, flush=True)
    for o in failed:
        print(f"sweep: FAILED {o.point.name}: {o.detail}\n    log: {o.point.log}", file=out,
              flush=True)
    if failed:
        print("sweep: fix the cause and run the same command again: finished points are "
              "skipped and failed ones retried", file=out, flush=True)
    return 1 if failed else 0


def terminate_on_sigterm() -> Callable[[], None]:
    """SIGTERM to the sweep becomes KeyboardInterrupt, so both stop the points the same way.
    Returns the function that restores the previous handler."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handle(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handle)
    return lambda: signal.signal(signal.SIGTERM, previous)


def slot_envs(parallel: int, gpus: int = 0) -> list[dict[str, str]]:
    """The environment of each of the `parallel` slots. With `gpus` (the host's GPU count)
    either each slot owns gpus/parallel GPUs (gpus a multiple of parallel), or parallel/gpus
    slots share each GPU (parallel a multiple of gpus: small points cannot fill one);
    without, the slots share the visible devices."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if gpus and gpus % parallel and parallel % gpus:
        raise SweepError(f"--gpus {gpus} and --parallel {parallel}: one must be a multiple of "
                         f"the other, so that every point gets the same share of the GPUs")
    if gpus and gpus >= parallel:
        per = gpus // parallel
        return [{**env, "CUDA_VISIBLE_DEVICES": ",".join(str(g) for g in
                                                         range(s * per, (s + 1) * per))}
                for s in range(parallel)]
    sharing = parallel // gpus if gpus else parallel
    # Several points on one GPU: JAX would give the first process 75% of the memory and
    # the others would run out; share it out instead. A user's own setting wins.
    if sharing > 1 and not any(k in env for k in ("XLA_PYTHON_CLIENT_MEM_FRACTION",
                                                  "XLA_PYTHON_CLIENT_PREALLOCATE")):
        env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{0.9 / sharing:.3f}"
    if not gpus:
        return [env] * parallel
    return [{**env, "CUDA_VISIBLE_DEVICES": str(s % gpus)} for s in range(parallel)]


def run_local(spec: SweepSpec, todo: list[Planned], parallel: int,
              progress: Progress, poll_s: float = 0.5, gpus: int = 0) -> list[Outcome]:
    """Up to `parallel` points at once, each a `spjax train` subprocess logging to its dir;
    with `gpus`, each on its own share of the host's GPUs (slot_envs)."""
    queue = list(todo)
    running: dict[int, tuple[Planned, subprocess.Popen, TextIO]] = {}
    outcomes: list[Outcome] = []
    envs = slot_envs(parallel, gpus)
    free_slots = list(range(parallel))
    slot_of: dict[int, int] = {}
    restore = terminate_on_sigterm()
    try:
        while queue or running:
            while queue and len(running) < parallel:
                planned = queue.pop(0)
                cmd = command(spec, planned.point)
                log = planned.point.log.open("a")
                log.write(f"=== spjax sweep: attempt at {time.strftime('%Y-%m-%d %H:%M:%S')}:"
                          f" {' '.join(cmd)}\n")
                log.flush()
                # Own session: a Ctrl-C at the terminal reaches only the sweep, which then
                # sends each point exactly one SIGTERM (a second one would abort its save).
                slot = free_slots.pop(0)
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                        env=envs[slot], stdin=subprocess.DEVNULL,
                                        start_new_session=True)
                slot_of[planned.point.index] = slot
                running[planned.point.index] = (planned, proc, log)
                progress.started(planned)
            for index, (planned, proc, log) in list(running.items()):
                code = proc.poll()
                if code is None:
                    continue
                log.close()
                del running[index]
                free_slots.append(slot_of.pop(index))
                status = point_status(planned.point, planned.config)
                if code == 0 and status.kind == "done":
                    outcomes.append(Outcome(planned.point, "done"))
                    progress.finished(planned.point, status.summary)
                else:
                    detail = failure_detail(planned.point, code)
                    outcomes.append(Outcome(planned.point, "failed", detail))
                    progress.failed_point(planned.point, detail)
            progress.tick([p for p, _, _ in running.values()])
            if running:
                time.sleep(poll_s)
    except KeyboardInterrupt:
        for planned, proc, log in running.values():
            proc.send_signal(signal.SIGTERM)  # each point saves a checkpoint and exits
        for planned, proc, log in running.values():
            try:
                proc.wait(timeout=300)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()
        names = ", ".join(p.point.name for p, _, _ in running.values()) or "none"
        raise SweepInterrupted(f"sweep interrupted; points stopped with a checkpoint: {names}; "
                               f"run the same command again to resume") from None
    finally:
        restore()
    return outcomes
