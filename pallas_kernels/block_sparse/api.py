"""`block_sparse_matmul(x, w, layout, block=..., implementation=...)`: Y = X (W * M) with
the tile mask M of `layout`, differentiable through a custom VJP whose three products all skip
pruned tiles:

  implementation="xla"        plain jnp (reference.py): runs anywhere, no skipping
  implementation="pallas"     the Pallas kernels on GPU
  implementation="interpret"  the same kernels interpreted on CPU (tests)

The weight gradient is dW = (X^T dY) * M: zero at pruned tiles, exactly the gradient of
X (W * M). x may have any leading dimensions; they are flattened into T rows and padded to a
multiple of the row tile.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.block_sparse import kernel, reference
from pallas_kernels.block_sparse.layout import BlockLayout

SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


class BlockSparseError(ValueError):
    """Bad input to the block-sparse matmul (shape, block size, dtype)."""


@dataclasses.dataclass(frozen=True)
class Settings:
    block: int
    implementation: str
    block_t: int
    num_warps: int
    num_stages: int


def block_sparse_matmul(x: jax.Array, w: jax.Array, layout: BlockLayout, *, block: int,
                        implementation: str = "xla", block_t: int = 128, num_warps: int = 4,
                        num_stages: int = 3) -> jax.Array:
    _check(x, w, layout, block, implementation, block_t)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    rows = x2.shape[0]
    padded = -(-rows // block_t) * block_t
    if padded != rows:  # pad with zero rows; they contribute nothing to dW
        x2 = jnp.pad(x2, ((0, padded - rows), (0, 0)))
    settings = Settings(block, implementation, block_t, num_warps, num_stages)
    y = _matmul(x2, w, layout, settings)
    return y[:rows].reshape(*lead, w.shape[1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _matmul(x, w, layout, settings):
    return _forward(x, w, layout, settings)


def _forward(x, w, layout, s):
    if s.implementation == "xla":
        return reference.matmul(x, w, layout.block_mask, s.block)
    return kernel.forward(x, w.astype(x.dtype), layout.col_table, layout.col_count,
                          block=s.block, block_t=s.block_t,
                          interpret=s.implementation == "interpret", num_warps=s.num_warps,
                          num_stages=s.num_stages)


def _matmul_fwd(x, w, layout, settings):
    return _forward(x, w, layout, settings), (x, w, layout)


def _matmul_bwd(s, residuals, dy):
    x, w, layout = residuals
    if s.implementation == "xla":
        dx = reference.input_grad(dy, w.astype(dy.dtype), layout.block_mask, s.block)
        dw = reference.weight_grad(x, dy.astype(x.dtype), layout.block_mask, s.block)
    else:
        interpret = s.implementation == "interpret"
        dx = kernel.input_grad(dy, w.astype(dy.dtype), layout.row_table, layout.row_count,
                               block=s.block, block_t=s.block_t, interpret=interpret,
                               num_warps=s.num_warps, num_stages=s.num_stages)
        dw = kernel.weight_grad(x, dy.astype(x.dtype), layout.block_mask, block=s.block,
                                block_t=s.block_t, interpret=interpret, out_dtype=w.dtype,
                                num_warps=s.num_warps, num_stages=s.num_stages)
    no_grad = jax.tree.map(lambda a: np.zeros(a.shape, jax.dtypes.float0), layout)
    return dx.astype(x.dtype), dw.astype(w.dtype), no_grad


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def _check(x, w, layout, block, implementation, block_t) -> None:
    if implementation not in ("xla", "pallas", "interpret"):
        raise BlockSparseError(f"implementation must be 'xla', 'pallas' or 'interpret', got "
                               f"{implementation!r}")
    if w.ndim != 2 or x.shape[-1] != w.shape[0]:
        raise BlockSparseError(f"x {x.shape} and w {w.shape} do not multiply: x's last "
                               f"dimension must equal w's first")
    k, n = w.shape
    if block <= 0 or k % block or n % block:
        raise BlockSparseError(f"block {block} does not divide the weight {k}x{n}; use a block "
                               f"that divides both dimensions")
    if layout.block_mask.shape != (k // block, n // block):
        raise BlockSparseError(f"layout mask has shape {layout.block_mask.shape}, but a {k}x{n} "
                               f"weight in {block}x{block} tiles needs "
                               f"{(k // block, n // block)}; rebuild it with build_layout")
    for name, a in (("x", x), ("w", w)):
        if a.dtype not in SUPPORTED_DTYPES:
            raise BlockSparseError(f"{name} has dtype {a.dtype}; supported: bfloat16, float16, "
                                   f"float32")
    if block_t <= 0 or block_t & (block_t - 1):
        raise BlockSparseError(f"block_t must be a power of two, got {block_t}")
