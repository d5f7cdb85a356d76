"""Warp-specialized Mosaic GPU kernels for the block-sparse forward and input gradient.

Same tables and results as kernel_mgpu._sparse_rows_matmul; the difference is how the work
is split inside a program. Each output tile is 2 block_m rows x one b-wide column of W's
tiles. Three warpgroups share it:
  - a memory warpgroup issues the TMA copies of the listed X (or dY) and W chunks into a
    ring of shared-memory stages;
  - two compute warpgroups each multiply their block_m rows of a stage by the stage's W
    chunk (wgmma into fp32 registers), then store their half of the tile.
One warpgroup's wgmma runs while the other waits for data, the structure of JAX's Hopper
matmul example (jax/experimental/pallas/ops/gpu/hopper_matmul_mgpu.py).

  per_tile  one emit_pipeline_warp_specialized per output tile: the pipeline drains at the
            end of every tile before the next tile's first copies are issued
  stream    one ring through all of the program's tiles, with hand-written producer and
            consumer loops, so the next tile's loads overlap this tile's epilogue
  weight_grad_stream
            the weight gradient the same way: work items are (kept b x b tile of dW, range
            of T), fp32 partials summed by XLA; each compute warpgroup owns half of the
            tile's rows

Interpret-mode tests run these with the interpreter's race detector on. On the H200
(2026-11-30, docs/BENCHMARKS.md) `stream` is the fastest forward and input grad at
16384x4096x16384; weight_grad_stream (kept tiles, split over tokens) beats Triton's split-K
at 32768x2816x1024 but loses at 16384x4096x16384 and 32768x1024x1024, so Triton keeps dW.

Shared memory: 3 stages of (2 block_m x 64 + 64 x b) bf16, plus a (2, block_m, b) epilogue
buffer: 208 KiB at block_m = b = 128, under the H100/H200's 227 KiB.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.block_sparse import kernel as triton_kernel
from pallas_kernels.block_sparse import kernel_mgpu as k
from pallas_kernels.block_sparse.layout import compact

MEMORY_REGISTERS = 40  # per thread of the TMA warpgroup; the two compute ones share the rest
COMPUTE_REGISTERS = int(min(256, (512 - MEMORY_REGISTERS) / 2) // 8 * 8)


def per_tile(lhs_TxC, w_KxN, table, count, *, block: int, out_cols: int, transpose_w: bool,
             tiling: k.MosaicTiling, interpret: bool):
    """_sparse_rows_matmul, warp-specialized. Per output tile (2 bm rows x b columns): a
    memory warpgroup streams the listed operand tiles into a ring of shared-memory stages
    (TMA), and two compute warpgroups each multiply their bm rows of every stage by the
    stage's weight chunk, so one warpgroup's wgmma runs while the other waits for data."""
    t = lhs_TxC.shape[0]
    bm, bk, b = tiling.block_m, tiling.block_k, block
    cta_m = 2 * bm
    chunks = b // bk
    grid_m, grid_o = t // cta_m, out_cols // b
    transforms = k._transforms(lhs_TxC.dtype)
    stages = min(tiling.max_concurrent_steps, 3)
    out_dtype = lhs_TxC.dtype

    def body(table_gmem, count_gmem, lhs_gmem, w_gmem, out_gmem):
        wg = jax.lax.axis_index("wg")

        def pipeline(oi, mma, context):
            def chunk(step):  # the step-th contracted chunk: its tile from the table
                return table_gmem[oi, step // chunks] * chunks + step % chunks

            delay = tiling.delay_release
            w_spec = (plgpu.BlockSpec((b, bk), lambda s: (0, chunk(s)), transforms=transforms,
                                      delay_release=delay)
                      if transpose_w else
                      plgpu.BlockSpec((bk, b), lambda s: (chunk(s), 0), transforms=transforms,
                                      delay_release=delay))
            lhs_spec = plgpu.BlockSpec((cta_m, bk), lambda s: (0, chunk(s)),
                                       transforms=transforms, delay_release=delay)
            return plgpu.emit_pipeline_warp_specialized(
                mma, grid=(count_gmem[oi] * chunks,), memory_registers=MEMORY_REGISTERS,
                in_specs=[lhs_spec, w_spec], wg_axis="wg", num_compute_wgs=2,
                max_concurrent_steps=stages, compute_context=context)

        ignore = lambda *_, **__: None  # noqa: E731 (allocations depend on shapes only)

        @functools.partial(pl.run_scoped,
                           ring=pipeline(0, ignore, ignore).get_allocations(lhs_gmem, w_gmem),
                           out_smem=plgpu.SMEM((2, bm, b), out_dtype,
                                               transforms=k._transforms(out_dtype)),
                           collective_axes="wg")
        def _(ring, out_smem):
            @plgpu.nd_loop((grid_m * grid_o,), collective_axes="sm")
            def _(loop):
                mi, oi = plgpu.planar_snake(loop.index[0], (grid_m, grid_o), 1,
                                            tiling.grid_block_n)

                def mma(_, lhs_smem, w_smem, acc_ref):
                    mine = lhs_smem.at[pl.ds(wg * bm, bm)]
                    plgpu.wgmma(acc_ref, mine, w_smem.transpose((1, 0)) if transpose_w
                                else w_smem)
                    # the stage is released when this returns (delay_release: the previous
                    # step's stage, whose wgmma this waits for)
                    plgpu.wgmma_wait(tiling.delay_release)
                    return acc_ref

                def context(run):  # compute warpgroups only: accumulate, then store
                    @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((bm, b)))
                    def _(acc_ref):
                        run(acc_ref)  # no listed tiles: the zero accumulator
                        plgpu.wgmma_wait(0)  # the last step's wgmma (delay_release)
                        acc = acc_ref[...].astype(out_dtype)
                        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # last tile's store
                        out_smem[wg] = acc
                        plgpu.commit_smem()
                        plgpu.copy_smem_to_gmem(
                            out_smem.at[wg],
                            out_gmem.at[pl.ds(mi * cta_m + wg * bm, bm), pl.ds(oi * b, b)])

                rows = lhs_gmem.at[pl.ds(mi * cta_m, cta_m), :]
                weights = (w_gmem.at[pl.ds(oi * b, b), :] if transpose_w
                           else w_gmem.at[:, pl.ds(oi * b, b)])
                pipeline(oi, mma, context)(rows, weights, allocations=ring)

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    out = jax.ShapeDtypeStruct((t, out_cols), out_dtype)
    return k._launch(body, out, grid_m * grid_o, interpret, num_threads=3,
                   thread_name="wg")(table, count, lhs_TxC, w_KxN)


def _streamed(operands, *, grid: tuple[int, int], a_block: tuple[int, int],
              b_block: tuple[int, int], acc_shape: tuple[int, int], out_shape, dtype,
              tiling: k.MosaicTiling, interpret: bool, plan):
    """The skeleton shared by the streamed kernels: one ring of `stages` shared-memory
    stages per program, filled by the memory warpgroup and drained by two compute
    warpgroups, through all of the program's output tiles (`grid`, walked by nd_loop).

    `plan(*gmem_refs)` returns the kernel's specifics, as functions of tile (i, j):
      steps(i, j)           chunks to stream for the tile (0: the tile is zeros)
      sources(i, j, s)      the GMEM slices of chunk s, for the a and b rings
      multiply(acc, a, b, wg)  warpgroup wg's wgmma of one stage into its accumulator
      destination(i, j, wg) where warpgroup wg's acc_shape part of the tile goes
      writes(i, j)          optional (a 5th entry): whether the tile is stored at all
    Stage g % stages is refilled once both compute warpgroups released its previous
    contents; barrier phases are tracked per waiting thread, so every wait pairs with the
    next completion of its stage."""
    stages = min(tiling.max_concurrent_steps, 3)
    out_dtype = out_shape.dtype
    if tiling.delay_release not in (0, 1):
        raise ValueError(f"delay_release must be 0 or 1, got {tiling.delay_release}")
    delayed = tiling.delay_release == 1

    def body(*refs):
        out_gmem = refs[-1]
        steps, sources, multiply, destination, *writes = plan(*refs[:-1])
        wg = jax.lax.axis_index("wg")

        def tiles(per_tile):  # every thread walks the same tiles, carrying the step count g
            @plgpu.nd_loop((grid[0] * grid[1],), collective_axes="sm", init_carry=jnp.int32(0))
            def walk(loop, carry):
                i, j = plgpu.planar_snake(loop.index[0], grid, 1, tiling.grid_block_n)
                return per_tile(i, j, steps(i, j), carry)

            return walk

        def scoped(a_ring, b_ring, out_smem, produced, consumed):
            def memory():
                plgpu.set_max_registers(MEMORY_REGISTERS, action="decrease")

                def per_tile(i, j, n, g):
                    def fetch(s, g):
                        slot = jax.lax.rem(g, stages)

                        @pl.when(g >= stages)  # the stage's previous chunk has been used
                        def _():
                            plgpu.barrier_wait(consumed.at[slot])

                        a_src, b_src = sources(i, j, s)
                        plgpu.copy_gmem_to_smem(a_src, a_ring.at[slot], produced.at[slot])
                        plgpu.copy_gmem_to_smem(b_src, b_ring.at[slot], produced.at[slot])
                        return g + 1

                    return jax.lax.fori_loop(0, n, fetch, g)

                total = tiles(per_tile)

                def drain(g, _):  # observe the last stages' releases before the barriers go
                    plgpu.barrier_wait(consumed.at[jax.lax.rem(g, stages)])

                jax.lax.fori_loop(jnp.maximum(total - stages, 0), total, drain, None)

            def compute():
                plgpu.set_max_registers(COMPUTE_REGISTERS, action="increase")

                def per_tile(i, j, n, g):
                    def accumulate(acc_ref):
                        def step(s, g):
                            slot = jax.lax.rem(g, stages)
                            plgpu.barrier_wait(produced.at[slot])
                            multiply(acc_ref, a_ring.at[slot], b_ring.at[slot], wg)
                            if delayed:  # this wait covers the previous wgmma: free its stage
                                plgpu.wgmma_wait(1)

                                @pl.when(s > 0)
                                def _():
                                    plgpu.barrier_arrive(consumed.at[jax.lax.rem(g - 1, stages)])
                            else:
                                plgpu.wgmma_wait(0)
                                plgpu.barrier_arrive(consumed.at[slot])
                            return g + 1

                        g_end = jax.lax.fori_loop(0, n, step, g)
                        if delayed:  # the tile's last wgmma, then its stage
                            plgpu.wgmma_wait(0)

                            @pl.when(n > 0)
                            def _():
                                plgpu.barrier_arrive(consumed.at[jax.lax.rem(g_end - 1, stages)])
                        return acc_ref[...], g_end  # no chunks: the zero accumulator

                    acc, g = pl.run_scoped(accumulate, plgpu.ACC(acc_shape))

                    def store():
                        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # last tile's store
                        out_smem[wg] = acc.astype(out_dtype)
                        plgpu.commit_smem()
                        plgpu.copy_smem_to_gmem(out_smem.at[wg],
                                                destination(out_gmem, i, j, wg))

                    if writes:
                        pl.when(writes[0](i, j))(store)
                    else:
                        store()
                    return g

                tiles(per_tile)
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)

            jax.lax.cond(wg == 2, memory, compute)

        swizzled = k._transforms(dtype)
        pl.run_scoped(
            scoped,
            a_ring=plgpu.SMEM((stages, *a_block), dtype, transforms=swizzled),
            b_ring=plgpu.SMEM((stages, *b_block), dtype, transforms=swizzled),
            out_smem=plgpu.SMEM((2, *acc_shape), out_dtype, transforms=k._transforms(out_dtype)),
            produced=plgpu.Barrier(num_arrivals=2, num_barriers=stages),  # two TMA copies
            consumed=plgpu.Barrier(num_arrivals=2, num_barriers=stages),  # two warpgroups
            collective_axes="wg")

    return k._launch(body, out_shape, grid[0] * grid[1], interpret, num_threads=3,
                     thread_name="wg")(*operands)


def stream(lhs_TxC, w_KxN, table, count, *, block: int, out_cols: int, transpose_w: bool,
           tiling: k.MosaicTiling, interpret: bool):
    """per_tile with one continuous ring per program (_streamed): output tile (mi, oi) streams
    the listed chunks of its weight column, and at its end stores while the next tile's
    first stages are already loading."""
    t = lhs_TxC.shape[0]
    bm, bk, b = tiling.block_m, tiling.block_k, block
    cta_m = 2 * bm
    chunks = b // bk

    def plan(table_gmem, count_gmem, lhs_gmem, w_gmem):
        def sources(mi, oi, s):
            c = table_gmem[oi, s // chunks] * chunks + s % chunks
            w_tile = (w_gmem.at[pl.ds(oi * b, b), pl.ds(c * bk, bk)] if transpose_w
                      else w_gmem.at[pl.ds(c * bk, bk), pl.ds(oi * b, b)])
            return lhs_gmem.at[pl.ds(mi * cta_m, cta_m), pl.ds(c * bk, bk)], w_tile

        def multiply(acc_ref, lhs_stage, w_stage, wg):
            plgpu.wgmma(acc_ref, lhs_stage.at[pl.ds(wg * bm, bm)],
                        w_stage.transpose((1, 0)) if transpose_w else w_stage)

        def destination(out_gmem, mi, oi, wg):
            return out_gmem.at[pl.ds(mi * cta_m + wg * bm, bm), pl.ds(oi * b, b)]

        return (lambda mi, oi: count_gmem[oi] * chunks), sources, multiply, destination

    return _streamed(
        (table, count, lhs_TxC, w_KxN), grid=(t // cta_m, out_cols // b),
        a_block=(cta_m, bk), b_block=(b, bk) if transpose_w else (bk, b), acc_shape=(bm, b),
        out_shape=jax.ShapeDtypeStruct((t, out_cols), lhs_TxC.dtype), dtype=lhs_TxC.dtype,
        tiling=tiling, interpret=interpret, plan=plan)


# Token ranges of the streamed weight gradient: the Triton split-K's program target, when
# about a quarter of the tiles are kept (75% sparse), within its cap on the fp32 partials.
TARGET_ITEMS = 4 * triton_kernel.TARGET_PROGRAMS


def token_splits(chunks: int, tiles: int, weight_elements: int) -> int:
    """A power of two dividing `chunks` (T / bt), at most TARGET_ITEMS / tiles."""
    want = max(1, TARGET_ITEMS // tiles)
    splits = 1
    while (splits * 2 <= min(want, chunks) and chunks % (splits * 2) == 0
           and splits * 2 * weight_elements * 4 <= triton_kernel.MAX_PARTIALS_BYTES):
        splits *= 2
    return splits


def weight_grad_stream(x_TxK, dy_TxN, block_mask, *, block: int, out_dtype,
                       tiling: k.MosaicTiling, interpret: bool) -> jax.Array:
    """dW = X^T dY on kept b x b tiles, zeros on pruned ones, streamed (_streamed) and split
    over tokens, as the Triton kernel's split-K: a 1024x1024 weight at 75% has 16 kept
    tiles for 132 SMs.

    Work items are (p, s): the p-th kept tile (kept tiles listed first, row-major) and the
    s-th of `splits` ranges of T. Per item the ring carries bt-row chunks of X[:, ki] and
    dY[:, ni] over its range; compute warpgroup w accumulates rows w b/2 .. (w+1) b/2 of the
    tile (wgmma M = 64 at b = 128) and stores an fp32 partial. Items past the kept count do
    nothing. XLA then sums the ranges and zeroes the pruned tiles, which no item writes.
    Block 128 only: at 64 a half tile is below wgmma's 64 rows."""
    t, kdim = x_TxK.shape
    n = dy_TxN.shape[1]
    b, bt = block, tiling.block_k
    half = b // 2
    nk, nn = kdim // b, n // b
    chunks = t // bt
    splits = token_splits(chunks, nk * nn, kdim * n)
    per_split = chunks // splits
    kept, count = compact(block_mask.reshape(1, -1) != 0)  # kept tiles first, row-major
    kept = kept[0]

    def plan(kept_gmem, count_gmem, x_gmem, dy_gmem):
        def tile(p):
            return kept_gmem[p] // nn, kept_gmem[p] % nn

        def live(p, _):
            return p < count_gmem[0]

        def steps(p, s):
            return jnp.where(live(p, s), per_split, 0)

        def sources(p, s, c):
            ki, ni = tile(p)
            rows = pl.ds((s * per_split + c) * bt, bt)
            return x_gmem.at[rows, pl.ds(ki * b, b)], dy_gmem.at[rows, pl.ds(ni * b, b)]

        def multiply(acc_ref, x_stage, dy_stage, wg):
            mine = x_stage.at[:, pl.ds(wg * half, half)]
            plgpu.wgmma(acc_ref, mine.transpose((1, 0)), dy_stage)

        def destination(out_gmem, p, s, wg):
            ki, ni = tile(p)
            return out_gmem.at[s, pl.ds(ki * b + wg * half, half), pl.ds(ni * b, b)]

        return steps, sources, multiply, destination, live

    partials = _streamed(
        (kept, count, x_TxK, dy_TxN), grid=(nk * nn, splits), a_block=(bt, b),
        b_block=(bt, b), acc_shape=(half, b),
        out_shape=jax.ShapeDtypeStruct((splits, kdim, n), jnp.float32), dtype=x_TxK.dtype,
        tiling=tiling, interpret=interpret, plan=plan)
    tiles = partials.sum(axis=0).reshape(nk, b, nn, b)
    keep = (block_mask != 0)[:, None, :, None]
    return jnp.where(keep, tiles, 0).reshape(kdim, n).astype(out_dtype)
