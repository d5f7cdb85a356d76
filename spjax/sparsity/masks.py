"""Mask patterns and layer-wise density distributions.

Patterns (all exact: a selection of k keeps exactly k, ties broken by position):
  - unstructured: any k weights of a layer;
  - N:M: in every group of M consecutive weights along the input dimension, exactly N;
  - block: b x b tiles, any k tiles of a layer.
Selections are per-layer ranks (one argsort per layer, k may be a traced value), never a global
sort across the model.

Distributions give each sparse layer its density: uniform, ERK (Evci et al. 2020), or
explicit per rule; the global non-zero count then hits the target within one unit (weight or
block) per layer.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp


# ----------------------------------------------------------------------------- selection


def rank_mask(scores: jax.Array, k: jax.Array | int) -> jax.Array:
    """bool mask (same shape) of the k highest scores; exact even with ties; k may be traced."""
    flat = scores.reshape(-1)
    order = jnp.argsort(-flat, stable=True)
    keep = jnp.arange(flat.size) < k
    return jnp.zeros(flat.shape, bool).at[order].set(keep).reshape(scores.shape)


def nm_mask(scores_IxO: jax.Array, n: int, m: int) -> jax.Array:
    """Keeps the n highest of every m consecutive scores along the input (first) dimension.

    Ties go to the lower index, as with a stable sort. For small m the rank of each entry is
    counted by pairwise comparison (m compares per weight, one fused elementwise pass), which
    is much cheaper than sorting when STE methods recompute the mask at every step.
    """
    d_in, d_out = scores_IxO.shape
    groups_GxMxO = scores_IxO.reshape(d_in // m, m, d_out)
    if m <= 16:
        mine = groups_GxMxO[:, :, None, :]  # [G, M(i), 1, O]
        other = groups_GxMxO[:, None, :, :]  # [G, 1, M(j), O]
        index = jnp.arange(m)
        earlier = (index[None, :] < index[:, None])[None, :, :, None]  # j < i
        beats = (other > mine) | ((other == mine) & earlier)
        ranks = beats.sum(axis=2)
    else:
        order = jnp.argsort(-groups_GxMxO, axis=1, stable=True)
        ranks = jnp.argsort(order, axis=1, stable=True)  # rank of each entry in its group
    return (ranks < n).reshape(d_in, d_out)


def block_scores(x_IxO: jax.Array, block: int) -> jax.Array:
    """Sum of |x| over each block x block tile: shape (I/b, O/b)."""
    d_in, d_out = x_IxO.shape
    tiles = jnp.abs(x_IxO).reshape(d_in // block, block, d_out // block, block)
    return tiles.sum(axis=(1, 3))


def expand_blocks(mask_BIxBO: jax.Array, block: int) -> jax.Array:
    return jnp.repeat(jnp.repeat(mask_BIxBO, block, axis=0), block, axis=1)


def is_nm_valid(mask_IxO: jax.Array, n: int, m: int) -> jax.Array:
    d_in, d_out = mask_IxO.shape
    return jnp.all(mask_IxO.reshape(d_in // m, m, d_out).sum(axis=1) == n)


# ----------------------------------------------------------------------------- distributions


def erk_densities(shapes: Mapping[str, Sequence[int]], density: float) -> dict[str, float]:
    """Erdos-Renyi-Kernel densities: d_l = eps * (sum of dims)/(product of dims), eps chosen so
    the total non-zeros equal density x total; a layer that would exceed 1 is made dense and
    eps recomputed over the rest (repeated until none exceeds 1). A stack of experts
    (E, I, O) is E layers of I x O: its ratio is (I + O)/(I O), its size E I O."""
    sizes = {name: math.prod(shape) for name, shape in shapes.items()}
    raw = {name: sum(shape[-2:]) / math.prod(shape[-2:]) for name, shape in shapes.items()}
    total = sum(sizes.values())
    dense: set[str] = set()
    while True:
        budget = density * total - sum(sizes[name] for name in dense)
        free = [name for name in shapes if name not in dense]
        eps = budget / sum(raw[name] * sizes[name] for name in free)
        over = [name for name in free if eps * raw[name] > 1.0]
        if not over:
            break
        dense.add(max(over, key=lambda name: raw[name]))  # the densest candidate first
    return {name: 1.0 if name in dense else eps * raw[name] for name in shapes}


def counts_for(densities: Mapping[str, float], units: Mapping[str, int]) -> dict[str, int]:
    """Kept units (weights or blocks) per layer: the nearest whole number to density x units."""
    return {name: int(min(units[name], max(0, round(densities[name] * units[name]))))
            for name in densities}
