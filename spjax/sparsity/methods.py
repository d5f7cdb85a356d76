"""Sparsity methods: small typed objects acting on one layer at a time.

A method answers, for one masked layer (kernel W, bool mask M, dense gradient G):
  init(W, key) -> M                      the mask at step 0
  due(t) -> bool                         whether the mask changes after step t (traced)
  update(t, W, M, G, key) -> M           the new mask (called only when due)
  optimizer_grad(t, W, M, G) -> G'       what the optimizer sees
  pruned_scale(t) -> float               forward factor of pruned weights (MDGF; else 0)
and, as class constants, whether it prunes for real (`hard`: pruned weights are zeroed,
regrown ones restart at zero, their optimizer moments are reset) or keeps dense weights
behind a straight-through mask (STE family).

Masks are selected in *units*: single weights, or b x b blocks for the block pattern; N:M
selects within groups. See masks.py for the exact selections.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from spjax.sparsity import schedules
from spjax.config.sparsity import SparsityConfig
from spjax.sparsity.masks import block_scores, expand_blocks, nm_mask, rank_mask


@dataclasses.dataclass(frozen=True)
class SparseLayer:
    """A masked layer and its final target: `keep` of `units` units (weights or blocks)."""

    name: str
    path: tuple[Any, ...]  # module path in the params / structure dicts
    shape: tuple[int, int]
    density: float
    units: int
    keep: int

    @property
    def kept_weights(self) -> int:
        return self.keep * (math.prod(self.shape) // self.units)


@dataclasses.dataclass(frozen=True)
class Pattern:
    kind: str  # unstructured | nm | block
    n: int
    m: int
    block: int

    def to_units(self, x: jax.Array) -> jax.Array:
        """Per-unit score magnitudes: |x| per weight, or summed |x| per block."""
        return block_scores(x, self.block) if self.kind == "block" else jnp.abs(x)

    def unit_mask(self, mask: jax.Array) -> jax.Array:
        return mask[:: self.block, :: self.block] if self.kind == "block" else mask

    def from_units(self, unit_mask: jax.Array) -> jax.Array:
        return expand_blocks(unit_mask, self.block) if self.kind == "block" else unit_mask

    def select(self, weight_scores: jax.Array, keep: jax.Array | int,
               n: int | None = None, m: int | None = None) -> jax.Array:
        """Mask of the best-scoring `keep` units (N:M: the best n of every m, `keep` unused)."""
        if self.kind == "nm":
            return nm_mask(weight_scores, n or self.n, m or self.m)
        unit_scores = self.to_units(weight_scores) if self.kind == "block" else weight_scores
        return self.from_units(rank_mask(unit_scores, keep))


class Method:
    hard = True  # pruned weights are zero; changes reset optimizer moments

    def __init__(self, config: SparsityConfig, total_steps: int):
        self.config = config
        self.total = total_steps
        self.pattern = Pattern(config.pattern, config.n, config.m, config.block)

    def init(self, layer: SparseLayer, kernel: jax.Array, key: jax.Array) -> jax.Array:
        """Random mask at the final density (static sparse from init)."""
        return self.pattern.select(jax.random.uniform(key, kernel.shape), layer.keep)

    def due(self, t: jax.Array) -> jax.Array:
        return jnp.asarray(False)

    def update(self, t: jax.Array, layer: SparseLayer, kernel: jax.Array, mask: jax.Array,
               grad: jax.Array, key: jax.Array) -> jax.Array:
        return mask

    def optimizer_grad(self, t: jax.Array, kernel: jax.Array, mask: jax.Array,
                       grad: jax.Array) -> jax.Array:
        return grad * mask.astype(grad.dtype)  # plain sparse training: only kept weights learn

    def pruned_scale(self, t: jax.Array) -> jax.Array:
        return jnp.zeros((), jnp.float32)

    def needs_dense_grad(self, t: jax.Array) -> jax.Array:
        """Whether the update after step t reads the dense gradient (RigL's regrowth)."""
        return jnp.asarray(False)


class Static(Method):
    """Random mask fixed from initialization (SPDF's sparse pre-training, random pruning)."""


class SPDF(Static):
    """Static sparse pre-training, then at `dense_at_fraction` all masks are removed; the
    pruned weights (zero) resume training, their moments zero."""

    def __init__(self, config: SparsityConfig, total_steps: int):
        super().__init__(config, total_steps)
        self.switch = schedules.at_fraction(config.spdf.dense_at_fraction, total_steps)

    def due(self, t: jax.Array) -> jax.Array:
        return t == self.switch

    def update(self, t, layer, kernel, mask, grad, key):
        return jnp.ones_like(mask)


class OneShot(Method):
    """Dense until `at_fraction`, then pruned once by magnitude to the final density."""

    def __init__(self, config: SparsityConfig, total_steps: int):
        super().__init__(config, total_steps)
        self.at = schedules.at_fraction(config.oneshot.at_fraction, total_steps)

    def init(self, layer, kernel, key):
        if self.at == 0:
            return self.pattern.select(jnp.abs(kernel), layer.keep)
        return jnp.ones(kernel.shape, bool)

    def due(self, t):
        return t == self.at

    def update(self, t, layer, kernel, mask, grad, key):
        return self.pattern.select(jnp.abs(kernel), layer.keep)


class Gradual(Method):
    """Gradual magnitude pruning with the cubic schedule; pruned weights never return."""

    def __init__(self, config: SparsityConfig, total_steps: int):
        super().__init__(config, total_steps)
        c = config.gmp
        self.start = schedules.at_fraction(c.start_fraction, total_steps)
        self.end = max(schedules.at_fraction(c.end_fraction, total_steps), self.start + 1)
        self.period = schedules.Periodic(self.start, self.end, c.update_every)
        self.power = c.power

    def init(self, layer, kernel, key):
        return jnp.ones(kernel.shape, bool)

    def due(self, t):
        # also at `end` exactly, so the final density is always reached
        return self.period.due(t) | (t == self.end)

    def keep_at(self, t: jax.Array, layer: SparseLayer) -> jax.Array:
        sparsity = schedules.cubic_sparsity(t, 1.0 - layer.density, self.start, self.end,
                                            self.power)
        keep = jnp.round((1.0 - sparsity) * layer.units).astype(jnp.int32)
        return jnp.where(t >= self.end, layer.keep, keep)

    def update(self, t, layer, kernel, mask, grad, key):
        scores = jnp.where(self.pattern.unit_mask(mask), self.pattern.to_units(kernel), -jnp.inf)
        return self.pattern.from_units(rank_mask(scores, self.keep_at(t, layer)))


class Dynamic(Method):
    """SET (random regrowth) and RigL (largest dense-gradient regrowth)."""

    def __init__(self, config: SparsityConfig, total_steps: int, regrow: str):
        super().__init__(config, total_steps)
        c = config.rigl if regrow == "gradient" else config.set
        self.regrow = regrow
        self.alpha = c.drop_fraction
        self.end = max(schedules.at_fraction(c.end_fraction, total_steps), 1)
        self.period = schedules.Periodic(c.update_every, self.end - 1, c.update_every)

    def due(self, t):
        return self.period.due(t)

    def needs_dense_grad(self, t):
        return self.due(t) if self.regrow == "gradient" else jnp.asarray(False)

    def update(self, t, layer, kernel, mask, grad, key):
        drop_key, grow_key = jax.random.split(key)
        active = self.pattern.unit_mask(mask)
        n_drop = jnp.floor(schedules.cosine_drop_fraction(t, self.alpha, self.end)
                           * layer.keep).astype(jnp.int32)
        magnitude = self.pattern.to_units(kernel)
        # tiny noise breaks ties among equal magnitudes at random, as in the RigL code
        noise = 1e-9 * jax.random.uniform(drop_key, magnitude.shape)
        kept = rank_mask(jnp.where(active, magnitude + noise, -jnp.inf), layer.keep - n_drop)
        if self.regrow == "gradient":
            grow_scores = self.pattern.to_units(grad)
        else:
            grow_scores = jax.random.uniform(grow_key, magnitude.shape)
        grown = rank_mask(jnp.where(kept, -jnp.inf, grow_scores), n_drop)
        return self.pattern.from_units(kept | grown)


class STE(Method):
    """Masks recomputed from |W| of dense weights; straight-through gradients; the variants
    add SR-STE's or AST's decay on pruned weights, MDGF's decaying forward factor, or SDGF's
    N:M sequence (see STEConfig)."""

    hard = False

    def __init__(self, config: SparsityConfig, total_steps: int, variant: str):
        super().__init__(config, total_steps)
        c = config.ste
        self.variant = variant
        self.c = c
        self.dense_until = schedules.at_fraction(c.dense_fraction, total_steps)
        self.fine_tune_from = total_steps - schedules.at_fraction(c.fine_tune_fraction,
                                                                  total_steps)
        self.ramp = max(schedules.at_fraction(c.ramp_fraction, total_steps), 1)
        self.patterns = (schedules.structure_decay_patterns(config.n, config.m,
                                                            c.structure_decay)
                         if variant == "sdgf" else [(config.n, config.m)])

    def frame(self, t: jax.Array) -> jax.Array:
        """SDGF: index of the N:M pattern in force, equal frames over the sparse phase."""
        span = max(self.fine_tune_from - self.dense_until, 1)
        frames = len(self.patterns)
        index = ((t - self.dense_until) * frames) // span
        return jnp.clip(index, 0, frames - 1)

    def magnitude_mask(self, t: jax.Array, layer: SparseLayer, kernel: jax.Array) -> jax.Array:
        scores = jnp.abs(kernel)
        if self.pattern.kind != "nm":
            return self.pattern.select(scores, layer.keep)
        branches = [lambda s, n=n, m=m: nm_mask(s, n, m) for n, m in self.patterns]
        return jax.lax.switch(self.frame(t), branches, scores)

    def init(self, layer, kernel, key):
        if self.dense_until > 0:
            return jnp.ones(kernel.shape, bool)
        return self.magnitude_mask(jnp.zeros((), jnp.int32), layer, kernel)

    def due(self, t):
        return (t >= self.dense_until) & (t % self.c.update_every == 0)

    def update(self, t, layer, kernel, mask, grad, key):
        return self.magnitude_mask(t, layer, kernel)

    def optimizer_grad(self, t, kernel, mask, grad):
        pruned = (~mask).astype(grad.dtype)
        if self.variant == "srste":
            return grad + self.c.srste_decay * pruned * kernel.astype(grad.dtype)
        if self.variant == "ast":
            lam = schedules.linear_ramp(t, self.c.ast_decay, self.ramp)
            return grad + lam.astype(grad.dtype) * pruned * kernel.astype(grad.dtype)
        return grad  # ste, mdgf, sdgf: dense straight-through gradient

    def pruned_scale(self, t):
        if self.variant != "mdgf":
            return jnp.zeros((), jnp.float32)
        # decays from 1 after the dense phase; forced binary in the fine-tune phase
        mu = schedules.mask_decay(jnp.maximum(t - self.dense_until, 0), self.c.mask_decay,
                                  self.c.decay_coef)
        return jnp.where(t >= self.fine_tune_from, 0.0, mu).astype(jnp.float32)


def build_method(config: SparsityConfig, total_steps: int) -> Method:
    name = config.method
    if name == "static":
        return Static(config, total_steps)
    if name == "spdf":
        return SPDF(config, total_steps)
    if name == "oneshot":
        return OneShot(config, total_steps)
    if name == "gmp":
        return Gradual(config, total_steps)
    if name in ("set", "rigl"):
        return Dynamic(config, total_steps, "gradient" if name == "rigl" else "random")
    return STE(config, total_steps, name)
