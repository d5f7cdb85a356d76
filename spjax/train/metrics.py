"""Metric sinks: RUN_DIR/metrics.jsonl (one JSON object per logged step) and TensorBoard.

Both are written in the caller's thread and flushed with every record, so a write that fails
(a full disk) is an OutputError there and then: one line naming the file and the fix, and the
run stops; rerunning the same command resumes from the last checkpoint and logs the steps
after it again.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import struct
import time
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from tensorboardX.proto.event_pb2 import Event, SessionLog
from tensorboardX.record_writer import masked_crc32c
from tensorboardX.summary import scalar

from spjax.errors import OutputError, write_failure

RESUME_HINT = "run the same command again: it resumes from the last checkpoint"


class MetricsWriter:
    """Appends to metrics.jsonl; on resume, drops records past the resumed step so the file
    reads as one clean run (a killed run may have logged steps the checkpoint does not hold)."""

    def __init__(self, run_dir: Path, resume_step: int, enabled: bool = True):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self._tb: _EventFile | None = None
        self._file = None
        self.nonfinite_before = 0  # steps up to resume_step skipped for non-finite values
        if not enabled:
            return
        try:
            self._truncate_after(resume_step)
        except OSError as e:
            raise OutputError(f"{write_failure(self.path, e)}; {RESUME_HINT}") from None
        with self._failures(self.path):
            self._file = self.path.open("a")
        with self._failures(run_dir / "tensorboard"):
            self._tb = _EventFile(run_dir / "tensorboard", purge_step=resume_step + 1)

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        text = self.path.read_text()
        kept = []
        for line in text.splitlines():
            try:
                record = json.loads(line)
                if record.get("step", 0) <= step:
                    kept.append(line)
                    self.nonfinite_before += bool(record.get("nonfinite"))
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
        content = "".join(f"{line}\n" for line in kept)
        if content == text:
            return
        # A new file renamed over the old: a write that fails (a full disk) leaves it whole.
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            tmp.write_text(content)
            os.replace(tmp, self.path)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        with self._failures(self.path):
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        scalars = {key: value for key, value in record.items()
                   if key != "step" and isinstance(value, (int, float)) and math.isfinite(value)}
        with self._failures(self._tb.path):
            self._tb.add_scalars(step, scalars)

    def close(self) -> None:
        if self.enabled:
            with self._failures(self.path):
                self._file.close()
            with self._failures(self._tb.path):
                self._tb.close()

    @contextlib.contextmanager
    def _failures(self, path: Path) -> Iterator[None]:
        """An OSError inside becomes an OutputError naming `path` and the fix."""
        try:
            yield
        except OSError as e:
            self._abandon()
            raise OutputError(f"{write_failure(path, e)}; {RESUME_HINT}") from None

    def _abandon(self) -> None:
        """Closes both files after a failed write, dropping what their buffers still hold
        (closing flushes, which fails again), so nothing retries it at exit."""
        for sink in (self._file, self._tb):
            if sink is not None:
                try:
                    sink.close()
                except OSError:
                    pass
        self.enabled = False


class _EventFile:
    """A TensorBoard event file (tfrecords of Event protos), written in the caller's thread
    and flushed with each logged step. tensorboardX's SummaryWriter writes from a thread of
    its own instead: when a write fails there (a full disk), that thread dies with a
    traceback and the training blocks forever in the next add_scalar, on a full queue."""

    def __init__(self, logdir: Path, purge_step: int):
        logdir.mkdir(parents=True, exist_ok=True)
        now = time.time()
        self.path = logdir / (f"events.out.tfevents.{int(now)}.{socket.gethostname()}."
                              f"{os.getpid()}")  # a process of its own: never shared
        self._file: BinaryIO = self.path.open("ab")
        self._write(Event(wall_time=now, file_version="brain.Event:2"))
        # As SummaryWriter(purge_step=...): TensorBoard hides what earlier files logged at
        # steps >= purge_step (a resumed run logs those steps again).
        self._write(Event(wall_time=now, step=purge_step, file_version="brain.Event:2"))
        self._write(Event(wall_time=now, step=purge_step,
                          session_log=SessionLog(status=SessionLog.START)))
        self._file.flush()

    def add_scalars(self, step: int, values: dict[str, float]) -> None:
        now = time.time()
        for key, value in values.items():
            self._write(Event(wall_time=now, step=step, summary=scalar(key, value)))
        self._file.flush()

    def _write(self, event: Event) -> None:
        data = event.SerializeToString()
        header = struct.pack("Q", len(data))
        self._file.write(header + struct.pack("I", masked_crc32c(header)) + data
                         + struct.pack("I", masked_crc32c(data)))

    def close(self) -> None:
        self._file.close()


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf
    return value
