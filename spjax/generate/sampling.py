"""Choosing the next token from logits: greedy, or sampled with temperature, top-k and top-p
(nucleus), in that order, as Hugging Face's generate applies them."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from spjax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy (argmax); otherwise logits / temperature
    top_k: int = 0  # keep the k most likely tokens (0: all)
    top_p: float = 1.0  # keep the smallest set whose probability reaches p (1: all)

    def validate(self) -> None:
        if self.temperature < 0:
            raise ConfigError(f"--temperature must be >= 0 (0: greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"--top-k must be >= 0 (0: no limit), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top-p must lie in (0, 1], got {self.top_p}")


def next_tokens(logits_BxV: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
    """int32 [B]: one token per row."""
    if sampling.temperature == 0:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    logits = logits_BxV.astype(jnp.float32) / sampling.temperature
    if sampling.top_k:
        kth = jax.lax.top_k(logits, min(sampling.top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # keep a token when the mass before it is below p: the first token always stays
        before = jnp.cumsum(probs, axis=-1) - probs
        keep_sorted = before < sampling.top_p
        keep = jnp.zeros_like(keep_sorted).at[
            jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
        logits = jnp.where(keep, logits, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
