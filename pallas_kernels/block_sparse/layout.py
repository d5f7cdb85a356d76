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


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockLayout:
    block_mask: jax.Array  # int32 (K/b, N/b)
    col_table: jax.Array  # int32 (N/b, K/b)
    col_count: jax.Array  # int32 (N/b,)
    row_table: jax.Array  # int32 (K/b, N/b)
    row_count: jax.Array  # int32 (K/b,)


def compact(mask_RxC: jax.Array) -> tuple[jax.Array, jax.Array]:
    """For each row, the column indices of its True entries first (in order), and their count."""
    cols = mask_RxC.shape[1]
    index = jnp.arange(cols, dtype=jnp.int32)
    # stable sort: kept columns first, in increasing order; the rest are padding
    order = jnp.argsort(jnp.where(mask_RxC, index[None, :], cols + index[None, :]), axis=1)
    count = mask_RxC.sum(axis=1, dtype=jnp.int32)
    table = jnp.where(index[None, :] < count[:, None], order, 0).astype(jnp.int32)
    return table, count


def build_layout(block_mask_KbxNb: jax.Array) -> BlockLayout:
    mask = block_mask_KbxNb.astype(bool)
    col_table, col_count = compact(mask.T)
    row_table, row_count = compact(mask)
    return BlockLayout(mask.astype(jnp.int32), col_table, col_count, row_table, row_count)


def block_mask_of(mask_KxN: jax.Array, block: int) -> jax.Array:
    """The tile-level mask of a weight-level mask whose tiles are all-or-nothing."""
    return mask_KxN[::block, ::block]
