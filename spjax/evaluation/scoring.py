"""Log-likelihoods of token continuations, batched: what lm-evaluation-harness asks a model
for (multiple-choice tasks score each choice's continuation; perplexity tasks score whole
documents in rolling windows).

Requests are (context tokens, continuation tokens). A batch is right-padded to a bucket
length: causal attention means the padding, after every real token, changes nothing it
scores. Requests are run longest first (fewer pad tokens, and the first batch shows at once
whether the longest fits in memory) and returned in the caller's order.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

Forward = Callable[[jax.Array], jax.Array]  # tokens int32[B, L] -> logits [B, L, V]
Request = tuple[Sequence[int], Sequence[int]]  # (context, continuation) token ids


class ContinuationScorer:
    """`score(requests)` -> [(summed log-probability of the continuation, whether greedy
    decoding would produce it)], each request cut to its last `max_len` input tokens."""

    def __init__(self, forward: Forward, max_len: int, batch_size: int, pad_id: int = 0,
                 progress: bool = False):
        self.max_len, self.batch_size, self.pad_id = max_len, batch_size, pad_id
        self.progress = progress

        @jax.jit
        def score_batch(inputs_BxL, targets_BxL, scored_BxL):
            logprobs = jax.nn.log_softmax(forward(inputs_BxL).astype(jnp.float32), axis=-1)
            picked = jnp.take_along_axis(logprobs, targets_BxL[..., None], axis=-1)[..., 0]
            greedy = jnp.argmax(logprobs, axis=-1) == targets_BxL
            total = jnp.sum(jnp.where(scored_BxL, picked, 0.0), axis=-1)
            return total, jnp.all(greedy | ~scored_BxL, axis=-1)

        self._score_batch = score_batch

    def score(self, requests: Sequence[Request]) -> list[tuple[float, bool]]:
        rows = [self._row(context, continuation) for context, continuation in requests]
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        results: list[tuple[float, bool]] = [(0.0, True)] * len(rows)
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        for batch in tqdm(batches, disable=not self.progress, unit="batch", desc="scoring"):
            length = _bucket(max(len(rows[i][0]) for i in batch), self.max_len)
            inputs = np.full((self.batch_size, length), self.pad_id, np.int32)
            targets = np.zeros((self.batch_size, length), np.int32)
            scored = np.zeros((self.batch_size, length), bool)
            for r, i in enumerate(batch):
                tokens, n_scored, next_tokens = rows[i]
                inputs[r, :len(tokens)] = tokens
                targets[r, :len(tokens)] = next_tokens
                scored[r, len(tokens) - n_scored:len(tokens)] = True
            totals, greedy = jax.device_get(self._score_batch(inputs, targets, scored))
            for r, i in enumerate(batch):
                results[i] = (float(totals[r]), bool(greedy[r]))
        return results

    def _row(self, context: Sequence[int], continuation: Sequence[int]
             ) -> tuple[np.ndarray, int, np.ndarray]:
        """(input tokens, how many of the last positions are scored, target tokens)."""
        if not continuation:
            raise ValueError("a continuation to score needs at least one token")
        if not context:
            raise ValueError("a continuation needs at least one context token before it "
                             "(lm-eval passes the end-of-text token for an empty context)")
        whole = np.asarray([*context, *continuation], np.int32)[-(self.max_len + 1):]
        n_scored = min(len(continuation), self.max_len)
        return whole[:-1], n_scored, whole[1:]


def rolling_windows(tokens: Sequence[int], prefix_id: int, max_len: int
                    ) -> list[Request]:
    """A document's tokens as disjoint (context, continuation) windows that together predict
    every token once, each seeing up to `max_len` tokens before it (the first token is
    predicted from `prefix_id`, the end-of-text token)."""
    tokens = list(tokens)
    windows: list[Request] = []
    start = 0
    while start < len(tokens):
        stop = min(start + max_len, len(tokens))
        context = ([prefix_id] + tokens)[max(0, stop - max_len):start + 1]
        windows.append((context, tokens[start:stop]))
        start = stop
    return windows


def _bucket(length: int, max_len: int) -> int:
    """Pad lengths to a few sizes (multiples of 64, powers of two below), so that a task of
    many different lengths compiles a handful of programs, not one per length."""
    if length <= 64:
        size = 1 << max(length - 1, 0).bit_length()
        return min(max(size, 8), max_len)
    return min(-(-length // 64) * 64, max_len)
