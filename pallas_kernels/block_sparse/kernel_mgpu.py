"""Mosaic GPU (Hopper: TMA + wgmma) kernels for the three block-sparse products.

Same tables and results as kernel.py (the Triton-lowered path); different machinery. Each
kernel is a persistent loop over output tiles spread across the SMs (`nd_loop` over "sm").
For each tile, a TMA pipeline (`emit_pipeline`) streams only the operand tiles that the
layout lists. The pipeline's step count is that tile's non-zero count, known only at run
time, and its index maps read the layout's int32 tables from global memory. Products
accumulate in fp32 wgmma registers and leave through shared memory with a TMA store.

  forward       out tile Y[m, j]  (block_m x b): steps over k in col_table[j], each b/bk
                wgmma's of X[m, k-chunk] (block_m x bk) @ W[k-chunk, j] (bk x b)
  input grad    out tile dX[m, k] (block_m x b): steps over j in row_table[k], each b/bk
                wgmma's of dY[m, j-chunk] @ W[k, j-chunk]^T
  weight grad   out tile dW[k, j] (b x b), only where block_mask[k, j]: steps over T in
                bk-row chunks, X[t, k]^T @ dY[t, j]; pruned tiles are stored as zeros

Warp-specialized variants of the forward and input grad (a TMA warpgroup feeding two
wgmma warpgroups) are in kernel_mgpu_ws.py, chosen by `MosaicTiling.warp_specialized`.

Shared-memory layouts use the 128-byte swizzle that wgmma wants (operand chunks of 64
bf16 along the contracted dimension). These kernels run on CPU too, under Mosaic GPU's
interpret mode (`interpret=True` here), which is how the tests check them.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

DEFAULT_SMS = 132  # H100/H200 SXM; the real count is read from the device when it is a GPU


@dataclasses.dataclass(frozen=True)
class MosaicTiling:
    block_m: int = 128  # rows of X / dY per output tile (forward, input grad)
    block_k: int = 64  # contracted elements per wgmma step (64 bf16 = one 128-byte swizzle)
    max_concurrent_steps: int = 4  # TMA stages in flight
    grid_block_n: int = 1  # output tile columns walked together (planar snake, L2 reuse)
    # forward and input grad: two compute warpgroups of block_m rows each (a 2 block_m x b
    # output tile) fed by a TMA warpgroup, as in JAX's Hopper matmul; at most 3 stages fit
    # in shared memory beside the epilogue buffers
    warp_specialized: bool = False
    # with warp_specialized: one ring of stages runs through all of a program's output tiles,
    # so the next tile's loads are in flight during this one's epilogue (the per-tile
    # pipeline drains between tiles)
    stream: bool = False
    # warp-specialized kernels: wgmma's left in flight when a compute warpgroup moves to the
    # next stage (0: wait for each before releasing its stage; 1: wait for the previous one
    # only, so issuing the next wgmma overlaps the last one's tail, and a stage is released
    # one step later), as `delay_release` in JAX's Hopper matmul
    delay_release: int = 0

    @property
    def rows_per_tile(self) -> int:
        """Rows of X / dY one output tile takes: T must be a multiple (the API pads)."""
        return max(self.block_m * (2 if self.warp_specialized else 1), self.block_k)


def _transforms(dtype) -> tuple:
    swizzle = plgpu.find_swizzle(64 * jnp.dtype(dtype).itemsize * 8)
    return (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)),
            plgpu.SwizzleTransform(swizzle))


def _num_sms(tiles: int) -> int:
    device = jax.devices()[0]
    sms = device.core_count if device.platform == "gpu" else DEFAULT_SMS
    return max(1, min(sms, tiles))


# Interpret mode's settings; tests switch on its race detector (`detect_races=True`), which
# reports shared-memory accesses that no barrier orders.
INTERPRET_PARAMS = plgpu.InterpretGPUParams()


def _launch(body, out_shape, tiles: int, interpret: bool, **threads):
    params = plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup)
    return plgpu.kernel(body, out_type=out_shape, grid=(_num_sms(tiles),), grid_names=("sm",),
                        compiler_params=params,
                        interpret=INTERPRET_PARAMS if interpret else None, **threads)


def _store(acc, out_gmem, rows: pl.Slice, cols: pl.Slice, transforms) -> None:
    @functools.partial(pl.run_scoped,
                       o_smem=plgpu.SMEM(acc.shape, out_gmem.dtype, transforms=transforms))
    def _(o_smem):
        o_smem[...] = acc.astype(o_smem.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, out_gmem.at[rows, cols])
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _sparse_rows_matmul(lhs_TxC, w_KxN, table, count, *, block: int, out_cols: int,
                        transpose_w: bool, tiling: MosaicTiling, interpret: bool):
    """Shared body of forward (transpose_w=False) and input grad (transpose_w=True).

    Output tile (mi, oi) sums, over the tiles listed in table[oi, :count[oi]], products of
    lhs[mi rows, listed tile's columns] with the matching weight tile (transposed for the
    input gradient, where the output runs over W's rows)."""
    if tiling.warp_specialized:  # kernel_mgpu_ws.py builds on this module's helpers
        from pallas_kernels.block_sparse import kernel_mgpu_ws

        variant = kernel_mgpu_ws.stream if tiling.stream else kernel_mgpu_ws.per_tile
        return variant(lhs_TxC, w_KxN, table, count, block=block, out_cols=out_cols,
                       transpose_w=transpose_w, tiling=tiling, interpret=interpret)
    t = lhs_TxC.shape[0]
    bm, bk, b = tiling.block_m, tiling.block_k, block
    chunks = b // bk  # wgmma steps per b x b weight tile
    grid_m, grid_o = t // bm, out_cols // b
    transforms = _transforms(lhs_TxC.dtype)

    def body(table_gmem, count_gmem, lhs_gmem, w_gmem, out_gmem):
        @plgpu.nd_loop((grid_m * grid_o,), collective_axes="sm")
        def _(loop):
            mi, oi = plgpu.planar_snake(loop.index[0], (grid_m, grid_o), 1,
                                        tiling.grid_block_n)
            n_tiles = count_gmem[oi]

            def chunk(step):  # the step-th contracted chunk: its tile from the table
                return table_gmem[oi, step // chunks] * chunks + step % chunks

            if transpose_w:  # W[oi tile rows, chunk cols], used transposed
                w_spec = plgpu.BlockSpec((b, bk), lambda s: (oi, chunk(s)),
                                         transforms=transforms, delay_release=1)
            else:  # W[chunk rows, oi tile cols]
                w_spec = plgpu.BlockSpec((bk, b), lambda s: (chunk(s), oi),
                                         transforms=transforms, delay_release=1)
            lhs_spec = plgpu.BlockSpec((bm, bk), lambda s: (mi, chunk(s)),
                                       transforms=transforms, delay_release=1)

            def step(_, lhs_smem, w_smem, acc_ref):
                plgpu.wgmma(acc_ref, lhs_smem,
                            w_smem.transpose((1, 0)) if transpose_w else w_smem)

            def acc_scope(acc_ref):
                @pl.when(n_tiles > 0)  # an empty tile column: the zero accumulator
                def _():
                    plgpu.emit_pipeline(
                        functools.partial(_with_acc, step, acc_ref), grid=(n_tiles * chunks,),
                        in_specs=[lhs_spec, w_spec],
                        max_concurrent_steps=tiling.max_concurrent_steps,
                    )(lhs_gmem, w_gmem)
                return acc_ref[...]

            acc = pl.run_scoped(acc_scope, plgpu.ACC((bm, b)))
            _store(acc, out_gmem, pl.ds(mi * bm, bm), pl.ds(oi * b, b), transforms)

    out = jax.ShapeDtypeStruct((t, out_cols), lhs_TxC.dtype)
    return _launch(body, out, grid_m * grid_o, interpret)(table, count, lhs_TxC, w_KxN)


def _with_acc(step, acc_ref, indices, *refs):
    step(indices, *refs, acc_ref)


def forward(x_TxK, w_KxN, col_table, col_count, *, block: int,
            tiling: MosaicTiling = MosaicTiling(), interpret: bool = False) -> jax.Array:
    return _sparse_rows_matmul(x_TxK, w_KxN, col_table, col_count, block=block,
                               out_cols=w_KxN.shape[1], transpose_w=False, tiling=tiling,
                               interpret=interpret)


def input_grad(dy_TxN, w_KxN, row_table, row_count, *, block: int,
               tiling: MosaicTiling = MosaicTiling(), interpret: bool = False) -> jax.Array:
    return _sparse_rows_matmul(dy_TxN, w_KxN, row_table, row_count, block=block,
                               out_cols=w_KxN.shape[0], transpose_w=True, tiling=tiling,
                               interpret=interpret)


def weight_grad(x_TxK, dy_TxN, block_mask, *, block: int, out_dtype,
                tiling: MosaicTiling = MosaicTiling(), interpret: bool = False) -> jax.Array:
    """dW (K x N): X^T dY on kept tiles, zeros on pruned ones (every tile is written)."""
    if tiling.warp_specialized and tiling.stream and block == 128:
        from pallas_kernels.block_sparse import kernel_mgpu_ws

        return kernel_mgpu_ws.weight_grad_stream(x_TxK, dy_TxN, block_mask, block=block,
                                                 out_dtype=out_dtype, tiling=tiling,
                                                 interpret=interpret)
    t, k = x_TxK.shape
    n = dy_TxN.shape[1]
    b, bt = block, tiling.block_k  # bt rows of T per step
    grid_k, grid_n = k // b, n // b
    transforms = _transforms(x_TxK.dtype)

    def body(mask_gmem, x_gmem, dy_gmem, out_gmem):
        @plgpu.nd_loop((grid_k * grid_n,), collective_axes="sm")
        def _(loop):
            ki, ni = plgpu.planar_snake(loop.index[0], (grid_k, grid_n), 1,
                                        tiling.grid_block_n)
            kept = mask_gmem[ki, ni] != 0

            def step(_, x_smem, dy_smem, acc_ref):
                plgpu.wgmma(acc_ref, x_smem.transpose((1, 0)), dy_smem)

            def acc_scope(acc_ref):
                @pl.when(kept)
                def _():
                    plgpu.emit_pipeline(
                        functools.partial(_with_acc, step, acc_ref), grid=(t // bt,),
                        in_specs=[
                            plgpu.BlockSpec((bt, b), lambda s: (s, ki), transforms=transforms,
                                            delay_release=1),
                            plgpu.BlockSpec((bt, b), lambda s: (s, ni), transforms=transforms,
                                            delay_release=1),
                        ],
                        max_concurrent_steps=tiling.max_concurrent_steps,
                    )(x_gmem, dy_gmem)
                return acc_ref[...]

            acc = pl.run_scoped(acc_scope, plgpu.ACC((b, b)))
            _store(acc, out_gmem, pl.ds(ki * b, b), pl.ds(ni * b, b), _transforms(out_dtype))

    out = jax.ShapeDtypeStruct((k, n), out_dtype)
    return _launch(body, out, grid_k * grid_n, interpret)(block_mask, x_TxK, dy_TxN)
