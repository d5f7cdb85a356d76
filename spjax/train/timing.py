"""Where a run's wall time goes: summary.json's `time_s` breakdown.

    startup      process start (or train() entry) to the state being ready: imports, data,
                 model and optimizer set-up, initialization (a resumed run's restore is
                 `restore`, not this)
    restore      reading the checkpoint a resumed run starts from
    compile      the train and eval steps (compiled ahead of time, side by side)
    train_steps  the training steps, host and device, eval and saves excluded
    eval         periodic and final evaluation
    checkpoint   checkpoint saves (the device-to-host copy, and waiting for writes to finish)
    summary      the final accounting and summary
    other        the rest: the wall time no part above claims

The loop dispatches steps asynchronously, so before an evaluation or a save it waits for the
steps in flight (`Clock.part(..., wait_for=state)`): their time counts as training, not as
the part that happened to wait for them.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Iterator

import jax

PARTS = ("startup", "restore", "compile", "train_steps", "eval", "checkpoint", "summary")


class Clock:
    """Accumulates seconds per part; `breakdown()` adds `other` and `total`."""

    def __init__(self, started: float | None = None):
        self.started = time.time() if started is None else started
        self.seconds = dict.fromkeys(PARTS, 0.0)

    def add(self, part: str, seconds: float) -> None:
        self.seconds[part] += seconds

    @contextlib.contextmanager
    def part(self, name: str, wait_for: Any = None) -> Iterator[None]:
        """Times the block as `name`; `wait_for` (a pytree of arrays) is first made ready,
        its wait counted as training time."""
        if wait_for is not None:
            start = time.time()
            jax.block_until_ready(wait_for)
            self.add("train_steps", time.time() - start)
        start = time.time()
        try:
            yield
        finally:
            self.add(name, time.time() - start)

    def breakdown(self) -> dict[str, float]:
        total = time.time() - self.started
        parts = {name: round(seconds, 3) for name, seconds in self.seconds.items()}
        parts["other"] = round(max(total - sum(self.seconds.values()), 0.0), 3)
        parts["total"] = round(total, 3)
        return parts
