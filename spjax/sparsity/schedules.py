"""Schedules of sparsity methods: pure functions of the (traced) step.

`t` is the number of optimizer steps completed (1 after the first step); fractions are of
`total` training steps and are rounded to whole steps once, in Python.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp


def at_fraction(fraction: float, total: int) -> int:
    return int(round(fraction * total))


@dataclasses.dataclass(frozen=True)
class Periodic:
    """True at t = start, start + every, ... while start <= t <= end."""

    start: int
    end: int
    every: int

    def due(self, t: jax.Array) -> jax.Array:
        return (t >= self.start) & (t <= self.end) & ((t - self.start) % self.every == 0)


def cubic_sparsity(t: jax.Array, final: float, start: int, end: int,
                   power: float = 3.0) -> jax.Array:
    """Zhu & Gupta gradual pruning: final * (1 - (1 - p)^power), p = clip((t - start)/(end - start))."""
    p = jnp.clip((t - start) / max(end - start, 1), 0.0, 1.0)
    return final * (1.0 - (1.0 - p) ** power)


def cosine_drop_fraction(t: jax.Array, alpha: float, end: int) -> jax.Array:
    """RigL: (alpha / 2)(1 + cos(pi t / end)), zero from `end` on."""
    frac = 0.5 * alpha * (1.0 + jnp.cos(jnp.pi * jnp.minimum(t, end) / end))
    return jnp.where(t < end, frac, 0.0)


def linear_ramp(t: jax.Array, peak: float, steps: int) -> jax.Array:
    """0 -> peak linearly over `steps`, then flat (AST's decay coefficient)."""
    return peak * jnp.clip(t / max(steps, 1), 0.0, 1.0)


def mask_decay(t: jax.Array, kind: str, coef: float) -> jax.Array:
    """MDGF factor of the pruned weights: linear max(0, 1 - k t) or exponential exp(-k t)."""
    t = jnp.asarray(t, jnp.float32)
    if kind == "linear":
        return jnp.maximum(0.0, 1.0 - coef * t)
    return jnp.exp(-coef * t)


def structure_decay_patterns(n: int, m: int, kind: str) -> list[tuple[int, int]]:
    """SDGF's N:M sequence ending at n:m.

    stepwise ('sparsify'): (m-1):m, m/2:m, m/4:m, ..., n:m   e.g. 1:8 -> 7:8, 4:8, 2:8, 1:8
    geometric ('fine'):    8n:8m, 4n:4m, 2n:2m, n:m           e.g. 1:8 -> 8:64, 4:32, 2:16, 1:8
    """
    if kind == "geometric":
        return [(n * 2 ** k, m * 2 ** k) for k in (3, 2, 1, 0)]
    frames = int(math.log2(m / n)) + 1
    patterns = [(m - 1, m)] + [(max(n, m // 2 ** k), m) for k in range(1, frames)]
    deduped: list[tuple[int, int]] = []
    for pattern in patterns:
        if not deduped or deduped[-1] != pattern:
            deduped.append(pattern)
    if deduped[-1] != (n, m):
        deduped.append((n, m))
    return deduped
