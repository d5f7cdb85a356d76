"""Checkpoints: an orbax `CheckpointManager` over three items per step.

- `state`: the whole `TrainState` (params, structure, optimizer state, step, rng), restored
  straight into its sharded layout, so a checkpoint from one mesh restores onto another;
- `data`: the data iterator's state (`TrainIterator.get_state()`: the next global batch index
  and the data fingerprint), so a resumed run sees exactly the batches it would have seen. It
  is global, the same in every process, so it is written once as JSON and restores into any
  process count (grain's own handler writes one file per process and restores only into the
  same count);
- `meta`: the model config and format version, checked *before* restoring so a mismatched
  checkpoint fails with a message naming the differing key instead of a shape error.

Saves are atomic: orbax writes into a temporary directory and renames it only once complete,
so a save that fails or is killed (even by SIGKILL) never touches the last good checkpoint;
leftover temporary directories are cleaned up on the next start. Saves are asynchronous, so a
save that fails (a full disk) is reported by the next `save` or by `wait`: a full disk as a
one-line CheckpointError naming the directory, the fix and the step a rerun resumes from.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
from pathlib import Path
from typing import Any, Iterator

import jax
import orbax.checkpoint as ocp

from spjax.errors import CheckpointError, is_disk_full
from spjax.tree import flat_paths, nest_paths

# 2: the data state is one JSON item for all processes (1 had one grain file per process)
FORMAT_VERSION = 2


class _DropDiskFullErrors(logging.Filter):
    """Orbax logs a failed background write with its traceback in each thread it passes
    through (four tracebacks for one full disk); the CheckpointError says it in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        exc = record.exc_info[1] if record.exc_info else None
        return not (is_disk_full(exc) or is_disk_full(Exception(record.getMessage())))


# Orbax logs every save at INFO; the training loop reports saves itself.
logging.getLogger("absl").setLevel(logging.WARNING)
logging.getLogger("absl").addFilter(_DropDiskFullErrors())


class Checkpointer:
    def __init__(self, directory: str | Path, keep: int):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               cleanup_tmp_directories=True)
        handlers = {"state": ocp.StandardCheckpointHandler(),
                    "data": ocp.JsonCheckpointHandler(),
                    "meta": ocp.JsonCheckpointHandler()}
        try:
            self._manager = ocp.CheckpointManager(self.directory, options=options,
                                                  item_handlers=handlers)
        except Exception as e:  # unreadable directory, broken metadata, ...
            if is_disk_full(e):
                raise CheckpointError(f"cannot open checkpoint directory {self.directory}: "
                                      f"no space left on its file system; free space there "
                                      f"and run the same command again") from None
            raise CheckpointError(f"cannot open checkpoint directory {self.directory}: "
                                  f"{_first_line(e)}") from None
        self._in_flight: int | None = None  # the step of a save that may still be writing
        self._failed: CheckpointError | None = None

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, data_iterator: Any, meta: dict[str, Any]) -> None:
        """Starts an asynchronous save of `step` (training continues while it is written),
        after the previous one has finished: a CheckpointError if that one failed."""
        self.wait()
        meta = {"format_version": FORMAT_VERSION, **meta}
        _drop_event_loop_noise()  # a failed write leaves callbacks raising in other threads
        self._in_flight = step
        with self._save_failures(step):
            self._manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_iterator.get_state()),
                meta=ocp.args.JsonSave(meta)), force=True)

    def restore(self, step: int, abstract_state: Any, data_iterator: Any,
                expected_meta: dict[str, Any], default_meta: dict[str, Any] | None = None
                ) -> Any:
        """Restores `step` into the sharded layout of `abstract_state`, and the data iterator.
        `default_meta`: the expected keys' default values (see _check_meta)."""
        where = self.directory / str(step)
        self.check_meta(step, expected_meta, default_meta)
        try:
            with _quiet_failed_reads():
                restored = self._manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state),
                    data=ocp.args.JsonRestore()))
        except Exception as e:
            raise CheckpointError(f"checkpoint {where} is corrupt or does not match this run "
                                  f"({_first_line(e)}); delete it to fall back to an earlier "
                                  f"one, or use a new run_dir") from None
        data_iterator.set_state(restored["data"])  # a CheckpointError names what differs
        return restored["state"]

    def check_meta(self, step: int, expected_meta: dict[str, Any],
                   default_meta: dict[str, Any] | None = None) -> None:
        """A CheckpointError unless `step`'s meta item matches `expected_meta` (reads only
        that small JSON item, not the state)."""
        where = self.directory / str(step)
        try:
            meta = self._manager.restore(step, args=ocp.args.Composite(
                meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:
            raise CheckpointError(f"checkpoint {where} is corrupt or unreadable "
                                  f"({_first_line(e)}); delete it to fall back to an earlier "
                                  f"one, or use a new run_dir") from None
        _check_meta(meta, {"format_version": FORMAT_VERSION, **expected_meta}, where,
                    default_meta)

    def wait(self) -> None:
        """Until the last save is written; a CheckpointError if it failed (again on every call
        after that, without touching orbax)."""
        if self._failed is not None:
            raise self._failed
        if self._in_flight is None:
            return
        with self._save_failures(self._in_flight):
            self._manager.wait_until_finished()
        self._in_flight = None

    def close(self) -> None:
        self.wait()
        self._manager.close()

    def complete_steps(self) -> list[int]:
        """The steps whose checkpoint is complete on disk (orbax renames a checkpoint to its
        step number only once it is; a failed save leaves a '<step>.orbax-checkpoint-tmp*'
        directory, removed on the next start)."""
        try:
            return sorted(int(p.name) for p in self.directory.iterdir()
                          if p.name.isdigit() and p.is_dir())
        except OSError:
            return []

    @contextlib.contextmanager
    def _save_failures(self, step: int) -> Iterator[None]:
        """A full disk while writing `step`: one CheckpointError with the directory, the fix
        and where a rerun resumes. Other failures propagate as they are."""
        try:
            yield
        except Exception as e:
            if not is_disk_full(e):
                raise
            complete = [s for s in self.complete_steps() if s != step]
            resume = (f"it resumes from step {complete[-1]}, the last complete checkpoint, "
                      f"which is intact" if complete else
                      "no checkpoint is complete yet, so it starts over")
            self._failed = CheckpointError(
                f"checkpoint of step {step} could not be written to {self.directory}: no "
                f"space left on its file system (or the quota is exhausted); free space there "
                f"(a save needs room for one checkpoint more than train.keep_checkpoints) and "
                f"run the same command again: {resume}")
            raise self._failed from None


def restore_matching(source: str | Path, abstract: dict[str, Any]
                     ) -> tuple[dict[str, Any], list[str], int]:
    """The latest checkpoint of another run (`source`: its run_dir or checkpoints/ folder),
    restored only where it matches `abstract` (nested dicts of ShapeDtypeStructs with
    shardings, e.g. {"params": ..., "structure": ...} of a TrainState): returns ({path:
    restored array}, paths of `abstract` the checkpoint lacks, its step). Paths are
    '/'-joined keys ('params/layers/0/attn/q/kernel'). A leaf present with another shape is
    a CheckpointError. Used by train.init_from: a new run starts from a trained one's weights
    with its own additions (an attention gate) freshly initialized."""
    directory = Path(source)
    if (directory / "checkpoints").is_dir():
        directory = directory / "checkpoints"
    if not directory.is_dir():
        raise CheckpointError(f"train.init_from: '{source}' is not a run directory or a "
                              f"checkpoints folder")
    handlers = {"state": ocp.PyTreeCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler()}
    try:
        manager = ocp.CheckpointManager(directory.absolute(), item_handlers=handlers)
    except Exception as e:
        raise CheckpointError(f"train.init_from: cannot read checkpoints in {directory}: "
                              f"{_first_line(e)}") from None
    try:
        return _restore_matching(manager, directory, abstract)
    finally:
        manager.close()


def _restore_matching(manager: ocp.CheckpointManager, directory: Path, abstract: Any
                      ) -> tuple[dict[str, Any], list[str], int]:
    step = manager.latest_step()
    if step is None:
        raise CheckpointError(f"train.init_from: no checkpoint in {directory}; train that run "
                              f"first or point at another run_dir")
    where = directory / str(step)
    try:
        saved = flat_paths(manager.item_metadata(step)["state"].tree)
    except Exception as e:
        raise CheckpointError(f"train.init_from: cannot read {where}: {_first_line(e)}"
                              ) from None
    found, missing = {}, []
    for path, leaf in flat_paths(abstract).items():
        meta = saved.get(path)
        if meta is None:
            missing.append(path)
        elif tuple(meta.shape) != tuple(leaf.shape):
            raise CheckpointError(f"train.init_from: {path} has shape {tuple(meta.shape)} in "
                                  f"{where} but {tuple(leaf.shape)} here; the models must "
                                  f"agree except for added parts")
        else:
            found[path] = leaf
    if not found:
        return {}, missing, step
    item = nest_paths(found)  # nested dicts with the checkpoint's (string) keys
    restore_args = jax.tree.map(
        lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, dtype=a.dtype), item)
    try:
        with _quiet_failed_reads():
            restored = manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                             partial_restore=True)))["state"]
    except Exception as e:
        raise CheckpointError(f"train.init_from: checkpoint {where} is corrupt or unreadable "
                              f"({_first_line(e)})") from None
    return flat_paths(restored), missing, step


def _check_meta(found: dict[str, Any], expected: dict[str, Any], where: Path,
                defaults: dict[str, Any] | None = None) -> None:
    """Every expected key must match. A key the checkpoint lacks is accepted when this run
    has it at its default (`defaults`): a config field added after the checkpoint was
    written, which changes nothing while it keeps its default."""
    found_flat, default_flat = _flatten(found), _flatten(defaults or {})
    for key, want in _flatten(expected).items():
        if key not in found_flat and key in default_flat and default_flat[key] == want:
            continue
        have = found_flat.get(key, "<missing>")
        if have != want:
            raise CheckpointError(
                f"checkpoint {where} is incompatible with this run: {key} is {have!r} there but "
                f"{want!r} here; restore with the matching config or use a new run_dir")


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = list(value) if isinstance(value, tuple) else value
    return flat


def _is_event_loop_noise(exc: BaseException | None) -> bool:
    return isinstance(exc, RuntimeError) and "Event loop is closed" in str(exc)


_noise_dropped = False


def _drop_event_loop_noise() -> None:
    """From now on, drops the 'Event loop is closed' errors of library threads (see
    _quiet_failed_reads): a save that fails (a full disk) closes orbax's event loop while
    other tensorstore writes are still in flight, at some point after `save` returned."""
    global _noise_dropped
    if _noise_dropped:
        return
    _noise_dropped = True
    saved = sys.excepthook, sys.unraisablehook, threading.excepthook
    sys.excepthook = lambda t, v, tb: None if _is_event_loop_noise(v) else saved[0](t, v, tb)
    sys.unraisablehook = lambda u: None if _is_event_loop_noise(u.exc_value) else saved[1](u)
    threading.excepthook = lambda a: None if _is_event_loop_noise(a.exc_value) else saved[2](a)


@contextlib.contextmanager
def _quiet_failed_reads() -> Iterator[None]:
    """Drops 'Event loop is closed' errors raised in library threads while restoring.

    When a read fails (a corrupt file), orbax closes its event loop while other tensorstore
    reads are still in flight; their completion callbacks then raise that error and print
    tracebacks around our one-line message. They carry no information. The filter stays
    installed after a failure, since those callbacks may still be arriving."""
    is_noise = _is_event_loop_noise
    saved = sys.excepthook, sys.unraisablehook, threading.excepthook
    sys.excepthook = lambda t, v, tb: None if is_noise(v) else saved[0](t, v, tb)
    sys.unraisablehook = lambda u: None if is_noise(u.exc_value) else saved[1](u)
    threading.excepthook = lambda a: None if is_noise(a.exc_value) else saved[2](a)
    yield
    sys.excepthook, sys.unraisablehook, threading.excepthook = saved


def _first_line(e: BaseException) -> str:
    """The gist of a library exception: its first sentence, capped, on one line."""
    text = " ".join(str(e).split())
    text = text.split(". ")[0][:160]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
