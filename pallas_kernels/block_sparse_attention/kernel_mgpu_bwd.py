"""Mosaic GPU (Hopper) backward of block-sparse flash attention: dQ and dK/dV kernels.

The machinery of kernel_mgpu.py (warp-specialized TMA pipelines over the listed tiles only,
block / 64 compute warpgroups of 64 rows each, the diagonal tile last and masked), the math
of kernel.py, with P = exp2(S - lse) and dS = P * (dO V^T - delta), delta = rowsum(O * dO)
computed by XLA outside:

  dQ     program (query head, query block i, sequence): the pipeline streams K and V of the
         kept key blocks of row i (row table); dQ[i] = scale * sum_j dS[i, j] K[j]
  dK/dV  program (query head, key block j, sequence): the pipeline streams Q, dO, lse and
         delta of the kept query blocks of column j (column table); in transposed form (the
         warpgroup's 64 key rows are wgmma's M), dV[j] += P^T dO, dK[j] += scale * dS^T Q

dK and dV are written per query head (B x T x H x D) and summed over each GQA group by XLA
in fp32 (as JAX's FA3 does): no cross-program reduction, no atomics. With H = Hkv the sum is
skipped. Query rows with no kept tile are never visited (no table lists them), so their dQ
is 0 and they add nothing to dK or dV.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.block_sparse_attention.kernel_mgpu import (
    LOG2E,
    MEMORY_REGISTERS,
    ROWS,
    MosaicAttentionTiling,
    causal_mask,
    launch,
    listed_block,
    matmul,
    program_tiles,
    stage,
    transforms,
)


def two_products(a1, b1, a2, b2, shape, on_first):
    """a1 @ b1 and a2 @ b2, issued back to back into fresh accumulators; `on_first` runs on
    the first result while the second wgmma is still in flight. (on_first(...), second)."""
    def scope(acc1, acc2):
        plgpu.wgmma(acc1, a1, b1)
        plgpu.wgmma(acc2, a2, b2)
        # wait for the first group only: `acc1[...]` would wait for every group in flight
        # (wait_n=0), which ran on_first after the second product, not under it
        out = on_first(plgpu.wgmma_accumulator_load(acc1, wait_n=1))
        plgpu.wgmma_wait(0)  # the second, and any wgmma on_first issued
        return out, acc2[...]

    acc = plgpu.ACC(shape, jnp.float32)
    return pl.run_scoped(scope, acc, acc)


def load_key_tiles(k_ref, v_ref, k_smem2, v_smem2, loaded, *, batch, kv_head, j, block: int,
                   wg):
    """Warpgroup wg's 64 rows of key block j (K and V of kv_head) into its slots of k_smem2
    and v_smem2, waited for (`loaded` expects the two copies). (k_smem, v_smem, rows)."""
    rows = pl.ds(j * block + wg * ROWS, ROWS)
    k_smem, v_smem = k_smem2.at[wg], v_smem2.at[wg]
    plgpu.copy_gmem_to_smem(k_ref.at[batch, rows, kv_head], k_smem, loaded)
    plgpu.copy_gmem_to_smem(v_ref.at[batch, rows, kv_head], v_smem, loaded)
    plgpu.barrier_wait(loaded)
    return k_smem, v_smem, rows


def accumulate_dk_dv(pipeline, d: int):
    """Runs a dK/dV pipeline whose steps add into two in-place wgmma accumulators (64 x d,
    fp32), carried as refs; returns their final values."""
    def scope(dk_acc, dv_acc):
        dk, dv = pipeline((dk_acc, dv_acc))
        return dk[...], dv[...]

    acc = plgpu.ACC((ROWS, d), jnp.float32)
    return pl.run_scoped(scope, acc, acc)


def write_dk_dv(dk, dv, k_smem, v_smem, dk_ref, dv_ref, rows) -> None:
    """dK and dV to their per-query-head `rows`, through the shared memory of the K and V
    tiles (no longer needed by then)."""
    k_smem[...] = dk.astype(k_smem.dtype)
    v_smem[...] = dv.astype(v_smem.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[rows])
    plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[rows])
    plgpu.wait_smem_to_gmem(0)


def _dq(q, k, v, do, lse, delta, layout, *, block, scale, interpret,
        tiling: MosaicAttentionTiling):
    in_place, overlap = tiling.backward_in_place, tiling.backward_overlap
    b, t, h, d = q.shape
    group = h // k.shape[2]
    wgs = block // ROWS
    qk_scale = scale * LOG2E
    swizzled = transforms(q.dtype)

    def body(table_ref, count_ref, diagonal_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
             delta_ref, dq_ref, q_smem2, do_smem2, ds_smem2, lse_smem2, delta_smem2, loaded):
        head, i, batch, wg, count, steps, row_table = program_tiles(
            table_ref, count_ref, diagonal_ref, layout, rows_grow=tiling.largest_first)

        def compute(pipeline):
            q_smem, do_smem = q_smem2.at[wg], do_smem2.at[wg]
            rows = (batch, pl.ds(i * block + wg * ROWS, ROWS), head)
            stats = (batch, head, rows[1])
            plgpu.copy_gmem_to_smem(q_ref.at[rows], q_smem, loaded.at[wg])
            plgpu.copy_gmem_to_smem(do_ref.at[rows], do_smem, loaded.at[wg])
            plgpu.copy_gmem_to_smem(lse_ref.at[stats], lse_smem2.at[wg], loaded.at[wg])
            plgpu.copy_gmem_to_smem(delta_ref.at[stats], delta_smem2.at[wg], loaded.at[wg])
            plgpu.barrier_wait(loaded.at[wg])
            if in_place:
                dq = pl.run_scoped(lambda acc: pipeline(acc)[...],
                                   plgpu.ACC((ROWS, d), jnp.float32))
            else:
                dq = pipeline(jnp.zeros((ROWS, d), jnp.float32))
            q_smem[...] = (dq * scale).astype(q_smem.dtype)  # Q is no longer needed
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[rows])
            plgpu.wait_smem_to_gmem(0)

        def step(indices, k_smem, v_smem, k_consumed, v_consumed, dq):
            q_smem, do_smem, ds_smem = q_smem2.at[wg], do_smem2.at[wg], ds_smem2.at[wg]

            def probabilities(s):
                s = s * qk_scale
                if layout.causal:
                    s = causal_mask(s, indices[0] == count, wg * ROWS, transposed=False)
                return jnp.exp2(s - lse_smem2.at[wg][...][:, None])

            if overlap:  # P is computed while dO V^T runs
                p, dp = two_products(q_smem, k_smem.transpose((1, 0)), do_smem,
                                     v_smem.transpose((1, 0)), (ROWS, block), probabilities)
            else:
                p = probabilities(matmul(q_smem, k_smem.transpose((1, 0)), (ROWS, block)))
                dp = matmul(do_smem, v_smem.transpose((1, 0)), (ROWS, block))
            plgpu.barrier_arrive(v_consumed)
            ds = p * (dp - delta_smem2.at[wg][...][:, None])
            stage(ds_smem, ds)
            if in_place:  # dq is the accumulator itself
                plgpu.wgmma(dq, ds_smem, k_smem)
                plgpu.wgmma_wait(0)  # it read K and dS: then K's slot and dS's buffer are free
            else:
                dq = dq + matmul(ds_smem, k_smem, (ROWS, d))
            plgpu.barrier_arrive(k_consumed)
            return dq

        def kv_index(s):
            return listed_block(row_table, count, i, s), 0

        pipeline = plgpu.emit_pipeline_warp_specialized(
            step, grid=(steps,), max_concurrent_steps=tiling.dq_steps, num_compute_wgs=wgs,
            memory_registers=MEMORY_REGISTERS, wg_axis="wg", manual_consumed_barriers=True,
            compute_context=compute,
            in_specs=[plgpu.BlockSpec((block, d), kv_index, transforms=swizzled)] * 2)
        g = jax.lax.div(head, group)
        pipeline(k_ref.at[batch, :, g, :], v_ref.at[batch, :, g, :])

    scratch = [plgpu.SMEM((wgs, ROWS, d), q.dtype, transforms=swizzled),  # Q, then dQ
               plgpu.SMEM((wgs, ROWS, d), q.dtype, transforms=swizzled),  # dO
               plgpu.SMEM((wgs, ROWS, block), q.dtype, transforms=swizzled),  # dS
               plgpu.SMEM((wgs, ROWS), jnp.float32),  # lse
               plgpu.SMEM((wgs, ROWS), jnp.float32),  # delta
               plgpu.Barrier(num_arrivals=4, num_barriers=wgs)]
    return launch(body, jax.ShapeDtypeStruct(q.shape, q.dtype), scratch,
                  grid=(h, t // block, b), compute_wgs=wgs, interpret=interpret)(
        layout.q_table, layout.q_count, layout.diagonal, q, k, v, do, lse, delta)


def _dkdv(q, k, v, do, lse, delta, layout, *, block, scale, interpret,
          tiling: MosaicAttentionTiling):
    """(dK, dV) per query head: B x T x H x D each, in q's dtype."""
    in_place, overlap = tiling.backward_in_place, tiling.backward_overlap
    b, t, h, d = q.shape
    group = h // k.shape[2]
    wgs = block // ROWS
    qk_scale = scale * LOG2E
    swizzled = transforms(q.dtype)

    def body(table_ref, count_ref, diagonal_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
             delta_ref, dk_ref, dv_ref, k_smem2, v_smem2, p_smem2, loaded):
        head, j, batch, wg, count, steps, col_table = program_tiles(
            table_ref, count_ref, diagonal_ref, layout)

        def compute(pipeline):
            k_smem, v_smem, rows = load_key_tiles(
                k_ref, v_ref, k_smem2, v_smem2, loaded.at[wg], batch=batch,
                kv_head=jax.lax.div(head, group), j=j, block=block, wg=wg)
            if in_place:
                dk, dv = accumulate_dk_dv(pipeline, d)
            else:
                zeros = jnp.zeros((ROWS, d), jnp.float32)
                dk, dv = pipeline((zeros, zeros))
            write_dk_dv(dk * scale, dv, k_smem, v_smem, dk_ref, dv_ref, (batch, rows, head))

        def step(indices, q_smem, do_smem, lse_smem, delta_smem, q_consumed, do_consumed,
                 lse_consumed, delta_consumed, carry):
            dk, dv = carry
            k_smem, v_smem, p_smem = k_smem2.at[wg], v_smem2.at[wg], p_smem2.at[wg]
            # transposed: rows are this warpgroup's keys, columns the tile's queries
            def probabilities(s):  # P^T, staged for the dV product
                s = s * qk_scale
                if layout.causal:
                    s = causal_mask(s, indices[0] == count, wg * ROWS, transposed=True)
                p = jnp.exp2(s - lse_smem[...][None, :])
                plgpu.barrier_arrive(lse_consumed)
                stage(p_smem, p)
                return p

            if overlap:  # P while V dO^T runs; then dV += P^T dO while dS is computed
                # (a wgmma into the carried dV inside two_products' scope does not lower)
                p, dp = two_products(k_smem, q_smem.transpose((1, 0)), v_smem,
                                     do_smem.transpose((1, 0)), (ROWS, block), probabilities)
                plgpu.wgmma(dv, p_smem, do_smem)
                ds = p * (dp - delta_smem[...][None, :])
                plgpu.barrier_arrive(delta_consumed)
                plgpu.wgmma_wait(0)  # the dV wgmma read dO and P: both are free now
                plgpu.barrier_arrive(do_consumed)
            else:
                p = probabilities(matmul(k_smem, q_smem.transpose((1, 0)), (ROWS, block)))
                if in_place:  # dk and dv are the accumulators themselves
                    plgpu.wgmma(dv, p_smem, do_smem)
                else:
                    dv = dv + matmul(p_smem, do_smem, (ROWS, d))
                dp = matmul(v_smem, do_smem.transpose((1, 0)), (ROWS, block))
                if in_place:
                    plgpu.wgmma_wait(0)  # the dV wgmma read dO and P: both are free now
                plgpu.barrier_arrive(do_consumed)
                ds = p * (dp - delta_smem[...][None, :])
                plgpu.barrier_arrive(delta_consumed)
            stage(p_smem, ds)  # the dV wgmma that read P has completed
            if in_place:
                plgpu.wgmma(dk, p_smem, q_smem)
                plgpu.wgmma_wait(0)  # it read Q and dS: then Q's slot and the buffer are free
            else:
                dk = dk + matmul(p_smem, q_smem, (ROWS, d))
            plgpu.barrier_arrive(q_consumed)
            return dk, dv

        def tile(s):
            return listed_block(col_table, count, j, s), 0

        def rows(s):
            return (listed_block(col_table, count, j, s),)

        pipeline = plgpu.emit_pipeline_warp_specialized(
            step, grid=(steps,), max_concurrent_steps=tiling.dkdv_steps, num_compute_wgs=wgs,
            memory_registers=MEMORY_REGISTERS, wg_axis="wg", manual_consumed_barriers=True,
            compute_context=compute,
            in_specs=[plgpu.BlockSpec((block, d), tile, transforms=swizzled)] * 2
            + [plgpu.BlockSpec((block,), rows)] * 2)
        pipeline(q_ref.at[batch, :, head, :], do_ref.at[batch, :, head, :],
                 lse_ref.at[batch, head, :], delta_ref.at[batch, head, :])

    scratch = [plgpu.SMEM((wgs, ROWS, d), q.dtype, transforms=swizzled),  # K, then dK
               plgpu.SMEM((wgs, ROWS, d), q.dtype, transforms=swizzled),  # V, then dV
               plgpu.SMEM((wgs, ROWS, block), q.dtype, transforms=swizzled),  # P^T, dS^T
               plgpu.Barrier(num_arrivals=2, num_barriers=wgs)]
    per_head = jax.ShapeDtypeStruct(q.shape, q.dtype)
    return launch(body, (per_head, per_head), scratch, grid=(h, t // block, b),
                  compute_wgs=wgs, interpret=interpret)(
        layout.k_table, layout.k_count, layout.diagonal, q, k, v, do, lse, delta)


def backward(q, k, v, o, lse, do, layout, *, block: int, scale: float, interpret: bool = False,
             tiling: MosaicAttentionTiling | None = None):
    """(dQ, dK, dV) from the forward's O and base-2 lse, as kernel.backward."""
    tiling = (tiling or MosaicAttentionTiling()).resolved(q.shape[-1], interpret)
    delta = jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do.astype(jnp.float32))
    if tiling.backward_overlap and not tiling.backward_in_place:
        raise ValueError("MosaicAttentionTiling.backward_overlap needs backward_in_place")
    common = {"block": block, "scale": scale, "interpret": interpret, "tiling": tiling}
    if tiling.fused_backward:
        from pallas_kernels.block_sparse_attention.kernel_mgpu_fused_bwd import fused_backward
        dq, dk, dv = fused_backward(q, k, v, do, lse, delta, layout, **common)
    else:
        dq = _dq(q, k, v, do, lse, delta, layout, **common)
        dk, dv = _dkdv(q, k, v, do, lse, delta, layout, **common)
    b, t, h, d = q.shape
    hkv = k.shape[2]
    if hkv != h:  # sum the group's query heads, in fp32
        dk, dv = (x.reshape(b, t, hkv, h // hkv, d).sum(axis=3, dtype=jnp.float32)
                  .astype(k.dtype) for x in (dk, dv))
    return dq, dk, dv
