"""Block metadata of a block-sparse weight W (K x N, b x b tiles), built from its block mask.

  col_table[j, :col_count[j]]  the non-zero tile rows k of tile column j (forward: Y[:, j])
  row_table[k, :row_count[k]]  the non-zero tile columns j of tile row k (input gradient:
                               dX[:, k], i.e. the transposed traversal)
  block_mask[k, j]             1 where tile (k, j) is kept (weight gradient: only those tiles)

Tables are padded with zeros to (nb, nb); only the first `count` entries are read. They are
pure functions of the mask: rebuild them when (and only when) the mask changes.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockLayout:
    block_mask: jax.Array  # int32 (K/b, N/b)
    col_table: jax.Array  # int32 (N/b, K/b)
    col_count: jax.Array  # int32 (N/b,)
    row_table: jax.Array  # int32 (K/b, N/b)
    row_count: jax.Array  # int32 (K/b,)


def compact(mask: jax.Array, xp=jnp) -> tuple[jax.Array, jax.Array]:
    """Along the last axis: the indices of the True entries first (in order), then zeros as
    padding; and their count. `xp` is jnp (traced tables) or numpy (constants under jit)."""
    cols = mask.shape[-1]
    index = xp.arange(cols, dtype=np.int32)
    # sort keys are distinct: kept columns keep their index, dropped ones sort after them
    order = xp.argsort(xp.where(mask, index, cols + index), axis=-1)
    count = mask.sum(axis=-1, dtype=np.int32)
    table = xp.where(index < count[..., None], order, 0).astype(np.int32)
    return table, count


def build_layout(block_mask_KbxNb: jax.Array) -> BlockLayout:
    mask = block_mask_KbxNb.astype(bool)
    col_table, col_count = compact(mask.T)
    row_table, row_count = compact(mask)
    return BlockLayout(mask.astype(jnp.int32), col_table, col_count, row_table, row_count)


def block_mask_of(mask_KxN: jax.Array, block: int) -> jax.Array:
    """The tile-level mask of a weight-level mask whose tiles are all-or-nothing."""
    return mask_KxN[::block, ::block]
