"""Block tables of a block-sparse attention mask, built once per mask.

The mask is (Bm, Hm, Nq, Nk) with Bm in {1, B} and Hm in {1, H} (query heads): one pattern
for all, one per head (static patterns are usually shared; a learned gate gives one per
sequence and head). With `causal`, tiles above the diagonal are dropped and the diagonal tile
(which needs the element-wise causal mask) is kept apart from the others:

  q_table[b, h, i, :q_count[b, h, i]]  kept key blocks j < i of query block i, ascending
                                       (forward and dQ: unmasked tiles)
  k_table[b, h, j, :k_count[b, h, j]]  kept query blocks i > j of key block j, ascending
                                       (dK/dV: the transposed traversal)
  diagonal[b, h, i]                    1 if tile (i, i) is kept (processed last, with the
                                       causal mask inside the tile)

Without `causal`, every kept tile is in the tables and `diagonal` is all zeros. Tables are
padded with zeros; only the first `count` entries are read. They are pure functions of the
mask: build them when (and only when) the mask changes. A numpy mask gives numpy tables
(constants under jit); a jax mask gives jax tables (traced, e.g. a learned gate's mask).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.block_sparse.layout import compact
from pallas_kernels.block_sparse_attention.reference import as_4d


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionLayout:
    block_mask: jax.Array  # int32 (Bm, Hm, Nq, Nk), causal part only when causal
    q_table: jax.Array  # int32 (Bm, Hm, Nq, Nk)
    q_count: jax.Array  # int32 (Bm, Hm, Nq)
    k_table: jax.Array  # int32 (Bm, Hm, Nk, Nq)
    k_count: jax.Array  # int32 (Bm, Hm, Nk)
    diagonal: jax.Array  # int32 (Bm, Hm, Nq)
    causal: bool = dataclasses.field(default=True, metadata=dict(static=True))

    @property
    def num_blocks(self) -> tuple[int, int]:
        return self.block_mask.shape[-2], self.block_mask.shape[-1]

    def kept_tiles(self) -> jax.Array:
        """Tiles each (Bm, Hm) pattern computes, the diagonal included: (Bm, Hm) int32."""
        return self.block_mask.sum(axis=(-2, -1), dtype=jnp.int32)


def build_layout(block_mask, *, causal: bool = True) -> AttentionLayout:
    """Tables of a (Nq, Nk), (Hm, Nq, Nk) or (Bm, Hm, Nq, Nk) block mask."""
    xp = np if isinstance(block_mask, np.ndarray) else jnp
    mask = as_4d(block_mask).astype(bool)
    nq, nk = mask.shape[-2:]
    if causal:
        if nq != nk:
            raise ValueError(f"a causal block mask must be square, got {nq} x {nk} blocks")
        mask = mask & xp.tril(xp.ones((nq, nk), bool))
        eye = xp.eye(nq, dtype=bool)
        diagonal = xp.diagonal(mask, axis1=-2, axis2=-1).astype(np.int32)
        off = mask & ~eye
    else:
        diagonal = xp.zeros(mask.shape[:-1], np.int32)
        off = mask
    q_table, q_count = compact(off, xp)
    k_table, k_count = compact(xp.swapaxes(off, -1, -2), xp)
    return AttentionLayout(mask.astype(np.int32), q_table, q_count, k_table, k_count,
                           diagonal, causal)


def causal_block_mask(num_blocks: int) -> np.ndarray:
    """The dense causal pattern: every tile on or below the diagonal."""
    return np.tril(np.ones((num_blocks, num_blocks), bool))
