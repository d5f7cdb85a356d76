"""`grouped_matmul(lhs, rhs, sizes, implementation=...)`: out = ragged_dot(lhs, rhs, sizes)
with a custom VJP, so the GPU path uses grouped kernels for all three products:

  implementation="ragged_dot"   jax.lax.ragged_dot and its autodiff (CPU, any GPU)
  implementation="pallas"       the Mosaic GPU kernels (Hopper): forward ragged_dot, input
                                gradient ragged_dot with transpose_rhs, weight gradient
                                transposed_ragged_dot; `tiles` picks each product's tiling

Rows past sum(sizes) (the padding of expert-parallel buffers) come out zero and get zero
input gradient, whichever implementation runs.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels.grouped_gemm import kernel, reference
from pallas_kernels.grouped_gemm.kernel import Tiles


@dataclasses.dataclass(frozen=True)
class ProductTiles:
    """One tiling per product; hashable, so it is a static argument of the custom VJP."""
    forward: Tiles = Tiles()
    input_grad: Tiles = Tiles()
    weight_grad: Tiles = Tiles()


def grouped_matmul(lhs_MxK: jax.Array, rhs_GxKxN: jax.Array, sizes_G: jax.Array,
                   implementation: str = "ragged_dot",
                   tiles: ProductTiles = ProductTiles(), padded: bool = True) -> jax.Array:
    """padded=False promises sum(sizes) == M (every row in a group: the dropless layer's
    buffers), which lets the Pallas path skip zeroing the rows past the groups."""
    if implementation == "ragged_dot":
        return reference.grouped_matmul(lhs_MxK, rhs_GxKxN, sizes_G)
    if implementation != "pallas":
        raise ValueError(f"implementation must be 'ragged_dot' or 'pallas', got "
                         f"{implementation!r}")
    return _pallas(lhs_MxK, rhs_GxKxN.astype(lhs_MxK.dtype), sizes_G, tiles, padded)


def _valid_rows(x: jax.Array, sizes_G: jax.Array, padded: bool) -> jax.Array:
    """The kernels leave rows outside every group unwritten: zero them (when there are any)."""
    if not padded:
        return x
    valid = jnp.arange(x.shape[0]) < jnp.sum(sizes_G)
    return jnp.where(valid[:, None], x, jnp.zeros_like(x))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _pallas(lhs, rhs, sizes, tiles, padded):
    return _valid_rows(kernel.forward(lhs, rhs, sizes, tiles.forward), sizes, padded)


def _pallas_fwd(lhs, rhs, sizes, tiles, padded):
    return _pallas(lhs, rhs, sizes, tiles, padded), (lhs, rhs, sizes)


def _pallas_bwd(tiles, padded, residuals, dout):
    lhs, rhs, sizes = residuals
    dout = _valid_rows(dout.astype(lhs.dtype), sizes, padded)
    dlhs = _valid_rows(kernel.input_grad(dout, rhs, sizes, tiles.input_grad), sizes, padded)
    drhs = kernel.weight_grad(lhs, dout, sizes, tiles.weight_grad)
    return dlhs, drhs.astype(rhs.dtype), None


_pallas.defvjp(_pallas_fwd, _pallas_bwd)
