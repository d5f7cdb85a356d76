"""`block_sparse_matmul(x, w, layout, block=..., implementation=...)`: Y = X (W * M) with
the tile mask M of `layout`, differentiable through a custom VJP whose three products all skip
pruned tiles:

  implementation="xla"               plain jnp (reference.py): runs anywhere, no skipping
  implementation="pallas"            Pallas kernels, Triton lowering (kernel.py): any NVIDIA GPU
  implementation="interpret"         the same, interpreted on CPU (tests)
  implementation="mosaic"            Pallas Mosaic GPU kernels (kernel_mgpu.py: TMA + wgmma),
                                     Hopper; bf16/f16 inputs, blocks 64 and 128
  implementation="mosaic_interpret"  the same, under Mosaic GPU's interpret mode on CPU (tests)
  implementation="mosaic_ws"         warp-specialized Mosaic forward and input grad
                                     (kernel_mgpu_ws.py; the weight grad is the plain one)
  implementation="mosaic_stream"     the same with one TMA ring per program through all its
                                     tiles, and a streamed weight grad at block 128
                                     (`*_interpret` of both: the interpreter, for tests)
  implementation="mosaic,pallas,pallas"  one per product: forward, input grad, weight grad
                                     (each measured on its own; the fastest may differ)

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

from pallas_kernels.block_sparse import kernel, kernel_mgpu, reference
from pallas_kernels.block_sparse.layout import BlockLayout

SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
IMPLEMENTATIONS = ("xla", "pallas", "interpret", "mosaic", "mosaic_interpret", "mosaic_ws",
                   "mosaic_ws_interpret", "mosaic_stream", "mosaic_stream_interpret")
# mosaic_ws: the warp-specialized Mosaic GPU kernels, one TMA pipeline per output tile;
# mosaic_stream: the same with one ring running through all of a program's tiles. mosaic_ws
# has no weight-gradient variant (it runs the plain Mosaic one there); mosaic_stream has one
# at block 128 (kernel_mgpu_ws.weight_grad_stream).
MOSAIC_DTYPES = (jnp.bfloat16, jnp.float16)  # wgmma's 16-bit operand types
MOSAIC_BLOCKS = (64, 128)


class BlockSparseError(ValueError):
    """Bad input to the block-sparse matmul (shape, block size, dtype)."""


@dataclasses.dataclass(frozen=True)
class Tiling:
    """One kernel's launch shape: `rows` of X per program (forward, input grad) or per loop
    step (weight grad), and Triton's warps and software-pipeline stages."""
    rows: int = 128
    num_warps: int = 4
    num_stages: int = 3


@dataclasses.dataclass(frozen=True)
class Tilings:
    forward: Tiling = Tiling()
    input_grad: Tiling = Tiling()
    weight_grad: Tiling = Tiling()


# Per block size, the fastest tiling of each kernel in `bench/block_sparse.py --sweep` on the
# H200 (docs/BENCHMARKS.md). Other block sizes (CPU tests, interpret mode) take the defaults.
TUNED_TILINGS: dict[int, Tilings] = {
    128: Tilings(forward=Tiling(64, 4, 2), input_grad=Tiling(64, 4, 2),
                 weight_grad=Tiling(64, 8, 4)),
    # forward measured; the other two not yet swept at block 64 (the sweep ran out of time)
    64: Tilings(forward=Tiling(128, 8, 2), input_grad=Tiling(128, 8, 2),
                weight_grad=Tiling(64, 8, 4)),
}


# The warp-specialized kernels' tiling from `--sweep` on the H200 (docs/BENCHMARKS.md): 3 ring
# stages (the most that fit) and tiles walked 8 columns at a time, so a band of X rows is reused
# from L2 across 8 output columns; 5-8% over one column at a time at 16384x4096x16384, 75%.
TUNED_WARP_SPECIALIZED = kernel_mgpu.MosaicTiling(max_concurrent_steps=3, grid_block_n=8)


def per_product(implementation: str) -> tuple[str, str, str]:
    """'pallas' -> ('pallas',) * 3; 'mosaic,pallas,pallas' -> (forward, input grad, weight
    grad) implementations. A BlockSparseError names a bad one."""
    parts = tuple(p.strip() for p in implementation.split(","))
    if len(parts) == 1:
        parts = parts * 3
    if len(parts) != 3 or any(p not in IMPLEMENTATIONS for p in parts):
        raise BlockSparseError(f"implementation must be one of {', '.join(IMPLEMENTATIONS)}, or "
                               f"three of them for forward,input_grad,weight_grad (e.g. "
                               f"'mosaic,pallas,pallas'), got {implementation!r}")
    return parts  # type: ignore[return-value]


@dataclasses.dataclass(frozen=True)
class Settings:
    block: int
    implementations: tuple[str, str, str]  # forward, input grad, weight grad
    tilings: Tilings
    mosaic: kernel_mgpu.MosaicTiling = kernel_mgpu.MosaicTiling()


def block_sparse_matmul(x: jax.Array, w: jax.Array, layout: BlockLayout, *, block: int,
                        implementation: str = "xla", tilings: Tilings | None = None,
                        block_t: int | None = None,
                        mosaic: kernel_mgpu.MosaicTiling | None = None) -> jax.Array:
    """`tilings` (Triton path) defaults to TUNED_TILINGS[block]; `block_t` sets every Triton
    kernel's row tile (tests use small ones); `mosaic` is the Mosaic GPU path's tiling (default:
    default_mosaic_tiling)."""
    if tilings is None:
        tilings = TUNED_TILINGS.get(block, Tilings())
    if block_t is not None:
        tilings = Tilings(*(dataclasses.replace(t, rows=block_t) for t in
                            (tilings.forward, tilings.input_grad, tilings.weight_grad)))
    implementations = per_product(implementation)
    mosaic = mosaic or default_mosaic_tiling(implementation)
    _check(x, w, layout, block, implementations, tilings)
    # rows are padded to a multiple of every row tile in use (all powers of two)
    row_tile = max(_mosaic_tiling(impl, mosaic).rows_per_tile if impl.startswith("mosaic")
                   else t.rows
                   for impl, t in zip(implementations, (tilings.forward, tilings.input_grad,
                                                        tilings.weight_grad)))
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    rows = x2.shape[0]
    padded = -(-rows // row_tile) * row_tile  # powers of two: a multiple of every row tile
    if padded != rows:  # pad with zero rows; they contribute nothing to dW
        x2 = jnp.pad(x2, ((0, padded - rows), (0, 0)))
    settings = Settings(block, implementations, tilings, mosaic)
    y = _matmul(x2, w, layout, settings)
    return y[:rows].reshape(*lead, w.shape[1])


def _warp_specialized(impl: str) -> bool:
    """Whether one product's implementation is a warp-specialized Mosaic kernel."""
    return impl.startswith(("mosaic_ws", "mosaic_stream"))


def default_mosaic_tiling(implementation: str) -> kernel_mgpu.MosaicTiling:
    """The Mosaic tiling block_sparse_matmul uses when given none: TUNED_WARP_SPECIALIZED when
    any product runs a warp-specialized kernel, else MosaicTiling()."""
    if any(_warp_specialized(p) for p in per_product(implementation)):
        return TUNED_WARP_SPECIALIZED
    return kernel_mgpu.MosaicTiling()


def _mosaic_tiling(impl: str, tiling: kernel_mgpu.MosaicTiling) -> kernel_mgpu.MosaicTiling:
    """The Mosaic tiling with the variant that the implementation name selects."""
    return dataclasses.replace(tiling, warp_specialized=_warp_specialized(impl),
                               stream=impl.startswith("mosaic_stream"))


# Each product is its own jit: a model's layers call it with equal shapes, and JAX lowers one
# jitted function once per module (a func.call per layer), where a bare kernel call is lowered
# (Mosaic GPU / Triton, in Python) again at every call site, 24 layers x 3 products.
@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _matmul(x, w, layout, settings):
    return _forward(x, w, layout, settings)


@functools.partial(jax.jit, static_argnames=("s",))
def _forward(x, w, layout, s):
    impl = s.implementations[0]
    if impl == "xla":
        return reference.matmul(x, w, layout.block_mask, s.block)
    if impl.startswith("mosaic"):
        return kernel_mgpu.forward(x, w.astype(x.dtype), layout.col_table, layout.col_count,
                                   block=s.block, tiling=_mosaic_tiling(impl, s.mosaic),
                                   interpret=impl.endswith("_interpret"))
    t = s.tilings.forward
    return kernel.forward(x, w.astype(x.dtype), layout.col_table, layout.col_count,
                          block=s.block, block_t=t.rows, interpret=impl == "interpret",
                          num_warps=t.num_warps, num_stages=t.num_stages)


def _matmul_fwd(x, w, layout, settings):
    return _forward(x, w, layout, settings), (x, w, layout)


@functools.partial(jax.jit, static_argnames=("s",))
def _input_grad(dy, w, layout, s):
    impl = s.implementations[1]
    if impl == "xla":
        return reference.input_grad(dy, w, layout.block_mask, s.block)
    if impl.startswith("mosaic"):
        return kernel_mgpu.input_grad(dy, w, layout.row_table, layout.row_count, block=s.block,
                                      tiling=_mosaic_tiling(impl, s.mosaic),
                                      interpret=impl.endswith("_interpret"))
    t = s.tilings.input_grad
    return kernel.input_grad(dy, w, layout.row_table, layout.row_count, block=s.block,
                             block_t=t.rows, interpret=impl == "interpret",
                             num_warps=t.num_warps, num_stages=t.num_stages)


@functools.partial(jax.jit, static_argnames=("out_dtype", "s",))
def _weight_grad(x, dy, layout, out_dtype, s):
    impl = s.implementations[2]
    if impl == "xla":
        return reference.weight_grad(x, dy, layout.block_mask, s.block)
    if impl.startswith("mosaic"):
        return kernel_mgpu.weight_grad(x, dy, layout.block_mask, block=s.block,
                                       out_dtype=out_dtype,
                                       tiling=_mosaic_tiling(impl, s.mosaic),
                                       interpret=impl.endswith("_interpret"))
    t = s.tilings.weight_grad
    return kernel.weight_grad(x, dy, layout.block_mask, block=s.block, block_t=t.rows,
                              interpret=impl == "interpret", out_dtype=out_dtype,
                              num_warps=t.num_warps, num_stages=t.num_stages)


def _matmul_bwd(s, residuals, dy):
    x, w, layout = residuals
    dy = dy.astype(x.dtype)
    dx = _input_grad(dy, w.astype(dy.dtype), layout, s)
    dw = _weight_grad(x, dy, layout, w.dtype, s)
    no_grad = jax.tree.map(lambda a: np.zeros(a.shape, jax.dtypes.float0), layout)
    return dx.astype(x.dtype), dw.astype(w.dtype), no_grad


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def _check(x, w, layout, block, implementations: tuple[str, ...], tilings: Tilings) -> None:
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
    for t in (tilings.forward, tilings.input_grad, tilings.weight_grad):
        if t.rows <= 0 or t.rows & (t.rows - 1):
            raise BlockSparseError(f"row tile (block_t) must be a power of two, got {t.rows}")
    if any(impl.startswith("mosaic") for impl in implementations):
        if x.dtype not in MOSAIC_DTYPES:
            raise BlockSparseError(f"the Mosaic GPU kernels take bfloat16 or float16 inputs, "
                                   f"got x of {x.dtype}; cast the activations (compute_dtype)"
                                   f" or use implementation='pallas'")
        if block not in MOSAIC_BLOCKS:
            raise BlockSparseError(f"the Mosaic GPU kernels support blocks 64 and 128, got "
                                   f"{block}; use implementation='pallas' for other blocks")
