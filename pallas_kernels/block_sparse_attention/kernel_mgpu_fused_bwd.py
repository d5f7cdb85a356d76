"""Mosaic GPU (Hopper) fused backward of block-sparse flash attention: one kernel, five products.

kernel_mgpu_bwd.py runs two kernels: dQ walks table rows, dK/dV walks columns, and both
recompute S and dP, seven tile products in all. Here, as in FlashAttention-2/3, one program
per (query head, key block j, sequence) walks the kept query blocks of column j and computes
everything from one S and one dP, five products per tile:

  S^T = K Q^T, dP^T = V dO^T             (this warpgroup's 64 keys x 64 queries)
  P^T = exp2(S^T - lse), dS^T = P^T * (dP^T - delta)
  dV += P^T dO, dK += dS^T Q             (accumulated in place through the column)
  dQ_part = dS K                         (64 queries x D, fresh each step)

and adds dQ_part into an fp32 dQ in global memory with a TMA reduce-add (the hardware adds
atomically; `cp.reduce.async.bulk`), as FA3 does. Programs of one query head add into the
same rows from different key blocks, so dQ arrives zeroed (a `jax.new_ref` operand, which
the kernel writes in place) and XLA scales and casts it afterwards.

Query tiles stream in 64-row steps (a kept block of 128 rows is two steps): that keeps each
warpgroup's live accumulators at dK, dV (64 x D each) plus either S^T and dP^T (64 x 64) or
dQ_part (64 x D), within the 232 or 240 registers a compute thread gets (see
backward_memory_registers), and the ring of Q, dO slots plus the fp32 dQ staging tile
within shared memory. Each step's reduce-add runs while the next step computes; its
staging tile is only rewritten once that copy has read it.

The interpreter (tests) has no TMA reductions in jax 0.11.2: pallas_kernels/interpret_reduce.py
adds them when this kernel is built for interpretation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.block_sparse_attention.kernel_mgpu import (
    LOG2E,
    ROWS,
    MosaicAttentionTiling,
    causal_mask,
    compiler_params,
    listed_block,
    matmul,
    program_tiles,
    stage,
    transforms,
)
from pallas_kernels.block_sparse_attention.kernel_mgpu_bwd import (accumulate_dk_dv,
                                                                  load_key_tiles,
                                                                  two_products, write_dk_dv)


def _launch(body, out_shape, scratch, *, grid, compute_wgs: int, interpret: bool,
            auto_barriers: bool):
    """kernel_mgpu.launch through pl.kernel: plgpu.kernel's custom_vmap wrapper takes no
    refs, and dQ is a ref the kernel adds into."""
    mesh = plgpu.Mesh(grid=grid, grid_names=("heads", "seq", "batch"),
                      num_threads=compute_wgs + 1, thread_name="wg")
    params = compiler_params(auto_barriers)
    if interpret:
        from pallas_kernels.interpret_reduce import install_tma_reductions
        install_tma_reductions()

    def kernel_body(*refs):
        pl.run_scoped(lambda *scratch_refs: body(*refs, *scratch_refs), *scratch,
                      collective_axes="wg")

    return pl.kernel(kernel_body, out_type=out_shape, mesh=mesh, compiler_params=params,
                     interpret=plgpu.InterpretGPUParams() if interpret else False,
                     name="block_sparse_attention_fused_bwd")


def fused_backward(q, k, v, do, lse, delta, layout, *, block: int, scale: float,
                   interpret: bool, tiling: MosaicAttentionTiling):
    """(dQ in q's dtype, dK and dV per query head, B x T x H x D each, in q's dtype)."""
    b, t, h, d = q.shape
    group = h // k.shape[2]
    wgs = block // ROWS  # compute warpgroups: 64 keys each
    sub = block // ROWS  # 64-row query steps per kept query block
    qk_scale = scale * LOG2E
    swizzled = transforms(q.dtype)
    # split: warpgroup w computes dQ's columns [w D/wgs, (w+1) D/wgs) over all the block's
    # keys, reading both warpgroups' dS^T (swizzled tiles are 64 columns wide, so D / wgs
    # must be a multiple of 64); otherwise each adds its own keys' partial over all of D
    split = tiling.fused_split_dq and wgs > 1 and (d // wgs) % 64 == 0
    cols = d // wgs if split else d
    buffers = 2 if split else 1  # dS^T by step parity: one may be read while one is written
    ring = tiling.fused_steps or (3 if d <= 64 else 2)  # measured: docs/BENCHMARKS.md
    registers = tiling.backward_registers  # GPU only: api.check refuses it interpreted

    def body(table_ref, count_ref, diagonal_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
             delta_ref, dq_ref, dk_ref, dv_ref, k_smem2, v_smem2, p_smem3, dq_smem2, loaded,
             ds_ready):
        head, j, batch, wg, count, steps, col_table = program_tiles(
            table_ref, count_ref, diagonal_ref, layout)

        def compute(pipeline):
            k_smem, v_smem, rows = load_key_tiles(
                k_ref, v_ref, k_smem2, v_smem2, loaded.at[wg], batch=batch,
                kv_head=jax.lax.div(head, group), j=j, block=block, wg=wg)
            dk, dv = accumulate_dk_dv(pipeline, d)
            plgpu.wait_smem_to_gmem(0)  # the last dQ reduce-add, before K's buffer is reused
            if split:  # and the other warpgroup's last dQ product, which read our K
                plgpu.barrier_arrive(ds_ready)
                plgpu.barrier_wait(ds_ready)
            write_dk_dv(dk * scale, dv, k_smem, v_smem, dk_ref, dv_ref, (batch, rows, head))

        def step(indices, q_smem, do_smem, lse_smem, delta_smem, q_consumed, do_consumed,
                 lse_consumed, delta_consumed, carry):
            dk, dv = carry
            k_smem, v_smem = k_smem2.at[wg], v_smem2.at[wg]
            s = indices[0]
            buffer = jax.lax.rem(s, buffers)
            p_smem, dq_smem = p_smem3.at[buffer, wg], dq_smem2.at[wg]
            tile, part = jax.lax.div(s, sub), jax.lax.rem(s, sub)
            rows = pl.ds((listed_block(col_table, count, j, tile) * sub + part) * ROWS, ROWS)

            def probabilities(scores):  # P^T (keys x queries), staged for the dV product
                scores = scores * qk_scale
                if layout.causal:
                    scores = causal_mask(scores, tile == count, wg * ROWS, transposed=True,
                                         col_offset=part * ROWS)
                p = jnp.exp2(scores - lse_smem[...][None, :])
                plgpu.barrier_arrive(lse_consumed)
                if not registers:
                    stage(p_smem, p)
                return p

            p, dp = two_products(k_smem, q_smem.transpose((1, 0)), v_smem,
                                 do_smem.transpose((1, 0)), (ROWS, ROWS), probabilities)
            # dV += P^T dO: P^T from registers (FA3) or from its staging tile
            plgpu.wgmma(dv, p.astype(q.dtype) if registers else p_smem, do_smem)
            ds = p * (dp - delta_smem[...][None, :])
            plgpu.barrier_arrive(delta_consumed)
            plgpu.wgmma_wait(0)  # the dV product read dO and P^T: both are free now
            plgpu.barrier_arrive(do_consumed)
            if registers:  # dK's product reads dS^T from registers; dQ's needs it staged
                ds16 = ds.astype(q.dtype)
                plgpu.wgmma(dk, ds16, q_smem)
                stage(p_smem, ds16)
            else:
                stage(p_smem, ds)  # dS^T
                plgpu.wgmma(dk, p_smem, q_smem)
            if not split:
                add_dq(matmul(p_smem.transpose((1, 0)), k_smem, (ROWS, d)),  # waits for dK
                       dq_smem, dq_ref.at[batch, rows, head])
                plgpu.barrier_arrive(q_consumed)
                return dk, dv
            plgpu.barrier_arrive(ds_ready)  # both warpgroups' dS^T are staged past here;
            plgpu.barrier_wait(ds_ready)  # the other buffer is the next step's (see above)
            for w in range(wgs):  # static column slices: one branch per warpgroup
                @pl.when(wg == w)
                def _():
                    def product(acc):
                        for key_wg in range(wgs):  # dS[:, its keys] @ K[its keys, my columns]
                            plgpu.wgmma(acc, p_smem3.at[buffer, key_wg].transpose((1, 0)),
                                        k_smem2.at[key_wg, :, pl.ds(w * cols, cols)])
                        return acc[...]  # waits for these and dK's

                    dq = pl.run_scoped(product, plgpu.ACC((ROWS, cols), jnp.float32))
                    add_dq(dq, dq_smem, dq_ref.at[batch, rows, head, pl.ds(w * cols, cols)])
            plgpu.barrier_arrive(q_consumed)
            return dk, dv

        def add_dq(dq, dq_smem, destination):
            """dQ's partial into global memory by TMA reduce-add; the previous step's copy
            has read the staging tile by now (or we wait for it)."""
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            dq_smem[...] = dq
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(dq_smem, destination, reduction_op="add")

        def query_rows(s):  # 64-row steps: block index of the kept tile times sub, plus part
            tile, part = jax.lax.div(s, sub), jax.lax.rem(s, sub)
            return listed_block(col_table, count, j, tile) * sub + part

        pipeline = plgpu.emit_pipeline_warp_specialized(
            step, grid=(steps * sub,), max_concurrent_steps=ring,
            num_compute_wgs=wgs, memory_registers=tiling.backward_memory_registers,
            wg_axis="wg", manual_consumed_barriers=True, compute_context=compute,
            in_specs=[plgpu.BlockSpec((ROWS, d), lambda s: (query_rows(s), 0),
                                      transforms=swizzled)] * 2
            + [plgpu.BlockSpec((ROWS,), lambda s: (query_rows(s),))] * 2)
        pipeline(q_ref.at[batch, :, head, :], do_ref.at[batch, :, head, :],
                 lse_ref.at[batch, head, :], delta_ref.at[batch, head, :])

    scratch = [plgpu.SMEM((wgs, ROWS, d), q.dtype, transforms=swizzled),  # K, then dK
               plgpu.SMEM((wgs, ROWS, d), q.dtype, transforms=swizzled),  # V, then dV
               plgpu.SMEM((buffers, wgs, ROWS, ROWS), q.dtype, transforms=swizzled),  # P^T, dS^T
               plgpu.SMEM((wgs, ROWS, cols), jnp.float32, transforms=transforms(jnp.float32)),
               plgpu.Barrier(num_arrivals=2, num_barriers=wgs),  # K, V loaded
               plgpu.Barrier(num_arrivals=wgs)]  # dS^T staged by every warpgroup
    dq = jax.new_ref(jnp.zeros((b, t, h, d), jnp.float32))  # programs add into it
    per_head = jax.ShapeDtypeStruct(q.shape, q.dtype)  # every row written by its program
    dk, dv = _launch(body, (per_head, per_head), scratch, grid=(h, t // block, b),
                     compute_wgs=wgs, interpret=interpret,
                     auto_barriers=tiling.auto_barriers)(
        layout.k_table, layout.k_count, layout.diagonal, q, k, v, do, lse, delta, dq)
    return (jax.freeze(dq) * scale).astype(q.dtype), dk, dv
