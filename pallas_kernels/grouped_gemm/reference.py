"""Grouped GEMM reference: out[rows of group g] = lhs[rows of group g] @ rhs[g].

Rows are sorted by group; rows past sum(group_sizes) produce zeros. Gradients by autodiff:
dlhs = ragged_dot(dout, rhs^T), drhs[g] = lhs[g rows]^T dout[g rows].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def grouped_matmul(lhs_MxK: jax.Array, rhs_GxKxN: jax.Array, sizes_G: jax.Array) -> jax.Array:
    return jax.lax.ragged_dot(lhs_MxK, rhs_GxKxN, sizes_G)


def input_grad(dout_MxN: jax.Array, rhs_GxKxN: jax.Array, sizes_G: jax.Array) -> jax.Array:
    return jax.lax.ragged_dot(dout_MxN, jnp.swapaxes(rhs_GxKxN, 1, 2), sizes_G)


def weight_grad(lhs_MxK: jax.Array, dout_MxN: jax.Array, sizes_G: jax.Array) -> jax.Array:
    """drhs (G, K, N): per group, lhs rows^T @ dout rows (rows outside every group ignored)."""
    g = sizes_G.shape[0]
    ends = jnp.cumsum(sizes_G)
    group_of_row = jnp.searchsorted(ends, jnp.arange(lhs_MxK.shape[0]), side="right")
    onehot = jax.nn.one_hot(group_of_row, g, dtype=lhs_MxK.dtype)  # rows past the end: 0
    return jnp.einsum("mg,mk,mn->gkn", onehot, lhs_MxK, dout_MxN,
                      preferred_element_type=jnp.float32).astype(lhs_MxK.dtype)
