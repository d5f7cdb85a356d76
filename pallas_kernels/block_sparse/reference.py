"""Plain-jnp block-sparse matmul: the truth every implementation is tested against.

Y = X (W * M), dX = dY (W * M)^T, dW = (X^T dY) * M, with M the tile mask expanded to
weights. fp32 accumulation (preferred_element_type), outputs in the input dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def expand(block_mask: jax.Array, block: int, dtype: jnp.dtype) -> jax.Array:
    full = jnp.repeat(jnp.repeat(block_mask.astype(bool), block, 0), block, 1)
    return full.astype(dtype)


def matmul(x_TxK: jax.Array, w_KxN: jax.Array, block_mask: jax.Array, block: int) -> jax.Array:
    w = w_KxN * expand(block_mask, block, w_KxN.dtype)
    return jnp.dot(x_TxK, w, preferred_element_type=jnp.float32).astype(x_TxK.dtype)


def input_grad(dy_TxN: jax.Array, w_KxN: jax.Array, block_mask: jax.Array,
               block: int) -> jax.Array:
    w = w_KxN * expand(block_mask, block, w_KxN.dtype)
    return jnp.dot(dy_TxN, w.T, preferred_element_type=jnp.float32).astype(dy_TxN.dtype)


def weight_grad(x_TxK: jax.Array, dy_TxN: jax.Array, block_mask: jax.Array,
                block: int) -> jax.Array:
    dw = jnp.dot(x_TxK.T, dy_TxN, preferred_element_type=jnp.float32)
    return (dw * expand(block_mask, block, jnp.float32)).astype(x_TxK.dtype)
