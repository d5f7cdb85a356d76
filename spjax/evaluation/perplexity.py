"""Loss, perplexity and bits per byte of a model over a whole split of a prepared dataset.

The split is cut into consecutive windows of `seq_len` predicted tokens (each target token
counted once; the tokens after the last whole window are left out and the count says how
many were scored). Cross-entropy is summed in fp32 per window on the device; bytes come
from the tokenizer (bytes.py), so bits per byte compares byte and BPE models.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from spjax.data.pipeline import TokenWindows
from spjax.data.tokenizer import Tokenizer
from spjax.errors import DataError
from spjax.evaluation.bytes import token_byte_lengths

# (inputs int32[B, T]) -> per-row summed cross-entropy in nats, fp32[B]
RowLosses = Callable[[np.ndarray, np.ndarray], jax.Array]


@dataclasses.dataclass(frozen=True)
class EvalResult:
    split: str
    tokens: int  # target tokens scored
    bytes: int  # UTF-8 bytes of their text
    loss: float  # mean cross-entropy per token, nats
    perplexity: float
    bits_per_byte: float
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def row_losses(forward: Callable[[jax.Array], jax.Array]) -> RowLosses:
    """Per-row summed cross-entropy from `forward(tokens_BxT) -> logits_BxTxV`, jitted."""

    @jax.jit
    def losses(inputs_BxT: jax.Array, targets_BxT: jax.Array) -> jax.Array:
        logits = forward(inputs_BxT).astype(jnp.float32)
        log_z = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, targets_BxT[..., None], axis=-1)[..., 0]
        return jnp.sum(log_z - picked, axis=-1)

    return losses


def evaluate_split(losses: RowLosses, dataset_dir: str | Path, tokenizer: Tokenizer,
                   seq_len: int, batch_size: int, split: str = "val", max_batches: int = 0,
                   progress: bool = True) -> EvalResult:
    """Scores every window of `split` (or the first `max_batches` batches)."""
    windows = TokenWindows(dataset_dir, split, seq_len)
    if len(windows) == 0:
        raise DataError(f"{windows.path}: the {split} split has {windows.num_tokens} tokens, "
                        f"fewer than one window of {seq_len + 1}; use a smaller --seq-len")
    byte_lengths = token_byte_lengths(tokenizer)
    batches = math.ceil(len(windows) / batch_size)
    if max_batches:
        batches = min(batches, max_batches)
    nats, tokens, n_bytes = 0.0, 0, 0
    start = time.time()
    bar = tqdm(total=batches, disable=not progress, unit="batch", desc=f"eval {split}")
    for b in range(batches):
        rows = [windows[i] for i in range(b * batch_size, min((b + 1) * batch_size,
                                                              len(windows)))]
        real = len(rows)
        rows += [rows[-1]] * (batch_size - real)  # one shape for every batch: one compile
        inputs = np.stack([r["inputs"] for r in rows])
        targets = np.stack([r["targets"] for r in rows])
        per_row = np.asarray(losses(inputs, targets))[:real]
        nats += float(per_row.sum(dtype=np.float64))
        tokens += real * seq_len
        n_bytes += int(byte_lengths[targets[:real]].sum())
        bar.update(1)
        bar.set_postfix(loss=f"{nats / tokens:.4f}", refresh=False)
    bar.close()
    loss = nats / tokens
    return EvalResult(split=split, tokens=tokens, bytes=n_bytes, loss=loss,
                      perplexity=math.exp(min(loss, 50.0)),
                      bits_per_byte=nats / (math.log(2) * n_bytes) if n_bytes else math.nan,
                      seconds=time.time() - start)
