"""grain pipelines over a prepared dataset: shuffled, checkpointable train batches; fixed eval batches.

A split is one token stream (documents packed end to end, EOS between them). Window i is
tokens [i*L, i*L + L + 1): consecutive windows overlap by one token so every token but the
first is a target exactly once per epoch. `inputs` = window[:-1], `targets` = window[1:].

Train order: a grain index shuffle of all windows (re-seeded every epoch by grain), cut to
a multiple of the process count and dealt round robin, so the processes of one run see
disjoint windows and together every window once per epoch. The batches form an indexable
`MapDataset` (element k = step k), so the iterator state is essentially one integer, the
next step: saving and restoring it is exact and cheap, at any step, across epochs, with or
without worker processes.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import grain
import numpy as np

from spjax.data.prepare import load_meta
from spjax.errors import CheckpointError, ConfigError, DataError

# Small, because elements are whole batches: grain's default (500) could buffer gigabytes.
READ_OPTIONS = grain.ReadOptions(num_threads=4, prefetch_buffer_size=8)


class TokenWindows:
    """Random-access source (grain `RandomAccessDataSource`) of packed windows of one split."""

    def __init__(self, path: str | Path, split: str, seq_len: int):
        if seq_len < 1:
            raise ConfigError(f"seq_len={seq_len} must be at least 1")
        self.path, self.split, self.seq_len = Path(path), split, seq_len
        meta = load_meta(self.path)
        info = meta["splits"][split]
        self._shards = [(self.path / name, n) for name, n in zip(info["shards"], info["shard_tokens"]) if n]
        self._starts = np.cumsum([0] + [n for _, n in self._shards])
        self._dtype = np.dtype(meta["dtype"])
        self.num_tokens = int(self._starts[-1])
        self._len = max(0, (self.num_tokens - 1) // seq_len)
        self._maps: list[np.memmap] | None = None  # opened lazily: once per (worker) process

    def __len__(self) -> int:
        return self._len

    def __getstate__(self) -> dict[str, Any]:
        # memmaps do not pickle well into grain worker processes; each reopens its own.
        return {**self.__dict__, "_maps": None}

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the split's stream as int32, across shard boundaries."""
        if self._maps is None:
            self._maps = [np.memmap(p, self._dtype, mode="r", shape=(n,)) for p, n in self._shards]
        parts = []
        k = int(np.searchsorted(self._starts, start, side="right")) - 1
        while start < stop:
            lo = start - int(self._starts[k])
            hi = min(stop - int(self._starts[k]), int(self._shards[k][1]))
            parts.append(self._maps[k][lo:hi])
            start += hi - lo
            k += 1
        return np.concatenate(parts).astype(np.int32)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        i = int(i)
        if not 0 <= i < self._len:
            raise IndexError(f"window {i} out of range [0, {self._len})")
        w = self.tokens(i * self.seq_len, i * self.seq_len + self.seq_len + 1)
        return {"inputs": w[:-1], "targets": w[1:]}

    def __repr__(self) -> str:
        return f"TokenWindows({str(self.path)!r}, {self.split!r}, seq_len={self.seq_len}, windows={self._len})"


def _shuffle_seed(seed: int) -> int:
    # grain shuffles epoch e with seed + e, so seeds s and s+1 would replay each other's
    # epochs one apart; hashing the user seed makes nearby seeds unrelated.
    return int.from_bytes(hashlib.blake2b(f"spjax-train-{seed}".encode(), digest_size=4).digest(), "little")


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ConfigError(f"process_index={process_index} is not in [0, process_count={process_count})")
    return process_index, process_count


def _local_batch(global_batch: int, process_count: int, what: str) -> int:
    if global_batch < 1 or global_batch % process_count:
        raise ConfigError(f"{what}={global_batch} is not a positive multiple of the process count {process_count}; use a multiple of {process_count}")
    return global_batch // process_count


def train_batches(path: str | Path, seq_len: int, global_batch: int, seed: int,
                  process_index: int | None = None, process_count: int | None = None) -> grain.MapDataset:
    """This process's infinite, indexable sequence of `{"inputs", "targets"}` int32
    `[local_batch, seq_len]` batches: element k is the batch of global step k."""
    process_index, process_count = _process(process_index, process_count)
    local_batch = _local_batch(global_batch, process_count, "global_batch")
    src = TokenWindows(path, "train", seq_len)
    usable = len(src) - len(src) % process_count
    if usable < global_batch:
        raise DataError(
            f"{src.path}: train split has {len(src)} windows of {seq_len + 1} tokens, fewer than one batch of "
            f"{global_batch}; add data or lower data.seq_len or data.batch_size")
    ds = grain.MapDataset.source(src).shuffle(seed=_shuffle_seed(seed))
    # One slice does both jobs: drop the (shuffled, so different each epoch) remainder and
    # deal the rest round robin. Indices past the slice's length continue into later epochs.
    ds = ds[process_index:usable:process_count].repeat(None)
    return ds.batch(local_batch, drop_remainder=True)


class TrainIterator(grain.DatasetIterator):
    """Iterator over `train_batches` whose state is `{"next_index": k, ...}`.

    grain's own state for `mp_prefetch` is per-worker and only restores into the same worker
    count. Here the state is the global step alone, and `set_state` restarts the pipeline at
    `batches[k:]`: exact, independent of `num_workers` (workers take batches round robin, so
    the order is the same for any count), and free of grain internals. It subclasses
    `grain.DatasetIterator` so `grain.checkpoint.CheckpointSave/Restore` store it as JSON.
    """

    def __init__(self, batches: grain.MapDataset, num_workers: int, fingerprint: dict[str, Any]):
        super().__init__()
        self._batches, self._num_workers, self._fingerprint = batches, num_workers, fingerprint
        self._next = 0
        self._it = self._start(0)

    def _start(self, k: int) -> grain.DatasetIterator:
        ds = self._batches[k:].to_iter_dataset(READ_OPTIONS)
        if self._num_workers > 0:
            from absl import flags

            # grain reads absl flags when starting workers; outside an absl app they are
            # unparsed and reading them raises UnparsedFlagAccessError. Defaults are fine.
            if not flags.FLAGS.is_parsed():
                flags.FLAGS.mark_as_parsed()
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._num_workers))
        return iter(ds)

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._it)
        self._next += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"next_index": self._next, **self._fingerprint}

    def set_state(self, state: dict[str, Any]) -> None:
        k = state.get("next_index") if isinstance(state, dict) else None
        if not isinstance(k, int) or k < 0:
            raise CheckpointError(f"data iterator state {state!r} has no valid next_index; restore a state saved by spjax's train_iterator")
        saved = {key: state[key] for key in self._fingerprint if key in state}
        if saved != self._fingerprint:
            raise CheckpointError(
                f"data iterator state was saved for {saved}, this run reads {self._fingerprint}; "
                "resume with the same dataset, seq_len, global_batch and seed")
        self._it.close()
        self._next = k
        self._it = self._start(k)

    def start_prefetch(self) -> None:
        self._it.start_prefetch()

    def close(self) -> None:
        if "_it" in self.__dict__:
            self._it.close()
        super().close()

    def __str__(self) -> str:
        return f"TrainIterator(next_index={self._next}, num_workers={self._num_workers}, {self._fingerprint})"


def train_iterator(path: str | Path, seq_len: int, global_batch: int, seed: int,
                   process_index: int | None = None, process_count: int | None = None,
                   num_workers: int = 0) -> TrainIterator:
    """Shuffled train batches for this process, repeating forever (reshuffled every epoch).

    Checkpointable: `get_state()`/`set_state()`, or with orbax via
    `grain.checkpoint.CheckpointSave(it)` / `CheckpointRestore(it)`. `num_workers > 0`
    prepares batches in that many grain worker processes; the batches and the state are the
    same as with 0. Restoring under a different process count is allowed (each process
    continues at the same step of a differently dealt epoch); a different dataset, seq_len,
    global_batch or seed is a CheckpointError.
    """
    if num_workers < 0:
        raise ConfigError(f"num_workers={num_workers} must be >= 0")
    batches = train_batches(path, seq_len, global_batch, seed, process_index, process_count)
    windows = len(TokenWindows(path, "train", seq_len))
    fingerprint = {"windows": windows, "seq_len": seq_len, "global_batch": global_batch, "seed": seed}
    return TrainIterator(batches, num_workers, fingerprint)


def eval_batches(path: str | Path, seq_len: int, batch_size: int, num_batches: int,
                 process_index: int | None = None, process_count: int | None = None) -> list[dict[str, np.ndarray]]:
    """The first `num_batches` global batches of the val split, in order, this process's rows.

    Global batch b is windows [b*batch_size, (b+1)*batch_size); process p holds its p-th
    block of `batch_size // process_count` rows (the layout `jax.make_array_from_process_local_data`
    expects). With fewer windows than asked, it returns ceil(windows / batch_size) batches,
    the last one filled by wrapping to the first windows so every batch has the same shape.
    """
    process_index, process_count = _process(process_index, process_count)
    local = _local_batch(batch_size, process_count, "eval batch_size")
    if num_batches < 1:
        raise ConfigError(f"num_batches={num_batches} must be at least 1")
    src = TokenWindows(path, "val", seq_len)
    if len(src) == 0:
        raise DataError(
            f"{src.path}: val split has {src.num_tokens} tokens, fewer than one window of {seq_len + 1}; "
            f"prepare it with a larger --val-fraction or use a smaller data.seq_len")
    n = min(num_batches, -(-len(src) // batch_size))
    out = []
    for b in range(n):
        rows = [src[(b * batch_size + process_index * local + r) % len(src)] for r in range(local)]
        out.append({k: np.stack([row[k] for row in rows]) for k in ("inputs", "targets")})
    return out
