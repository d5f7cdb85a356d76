"""Mosaic GPU (Hopper: TMA + wgmma, warp-specialized) forward of block-sparse flash attention.

Same tables, statistics and results as kernel.py (the Triton lowering); Hopper machinery as in
JAX's FlashAttention-3 (jax/experimental/pallas/ops/gpu/attention_mgpu.py), made block-sparse.
One program (CTA) per (query head, query block i, sequence), grid (H, T/b, B), with
block / 64 compute warpgroups and one memory warpgroup:

  - each compute warpgroup owns 64 query rows of block i (wgmma's M is 64 per warpgroup), so
    block 128 runs two consumers that share every K/V tile the memory warpgroup fetches;
  - the memory warpgroup streams, by TMA into a ring of `max_concurrent_steps` slots, only the
    key blocks listed in the row table: steps 0 .. q_count[i] - 1 read q_table[i, step], then
    one more step reads the diagonal tile i when it is kept (causal). The step count is read
    from the table at run time (`emit_pipeline_warp_specialized` with a dynamic grid);
  - per step: S = Q K^T (wgmma, fp32), the causal mask only on the diagonal step, online
    softmax in base 2 (logits pre-multiplied by scale * log2 e), O = alpha O + P V (wgmma).
    K's slot is released right after Q K^T, V's after P V, so the next TMA starts early.

Two constructs have two forms, because Mosaic GPU's interpreter (jax 0.11.2, the only way
to run these kernels on CPU) cannot run the faster ones. On the GPU (by default: see
MosaicAttentionTiling.resolved) P is wgmma's register operand and O is rescaled in its
accumulator in place, as in FA3, and the two compute warpgroups take turns (ping-pong).
In the interpreter P goes through shared memory into an SS wgmma and every product lands
in a fresh zero accumulator added to the carry (`matmul`), since its wgmma takes no
register operand and it has no rule for run_state_p or for storing into an accumulator.
The backward's sums need no rescaling, and the interpreter does run a wgmma accumulating
into an accumulator carried through the pipeline: `MosaicAttentionTiling.backward_in_place`
does that for dQ, dK and dV, and `backward_overlap` overlaps each step's softmax math with
its dP wgmma (both on by default: 5-8% off forward+backward on the H200). Not done: a
persistent grid.

A row block with no kept tile runs zero steps: its accumulator and running sum stay 0, so
O = 0 / max(l, 1) = 0 and lse = -inf + log2(1) = -inf, the convention of reference.py, with
no extra select (l >= 1 for every row that saw a key: its maximum contributes exp2(0) = 1).

The backward is in kernel_mgpu_fused_bwd.py (one kernel, the default) or kernel_mgpu_bwd.py
(the dQ and dK/dV kernels; `MosaicAttentionTiling(fused_backward=False)`). Runs on CPU under
Mosaic GPU's interpret mode (`interpret=True`), which is how the tests check it.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

LOG2E = math.log2(math.e)
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: exp2 gives 0, never NaN
ROWS = 64  # rows per compute warpgroup: wgmma's M
MEMORY_REGISTERS = 40  # the memory warpgroup only issues TMAs (as in FA3)


@dataclasses.dataclass(frozen=True)
class MosaicAttentionTiling:
    """TMA ring depth of each kernel (shared memory: slots x (K + V) or (Q + dO) tiles)."""
    forward_steps: int = 2
    dq_steps: int = 2
    dkdv_steps: int = 2
    # two-kernel backward: dQ, dK and dV accumulate in place in wgmma accumulators
    # (no per-step zero accumulator, register copy and add); the interpreter runs this form,
    # since these sums need no rescaling (the forward's O does, so it keeps `matmul`)
    # (on by default: with backward_overlap, forward+backward is 5-8% faster on the H200 than
    # with fresh accumulators; in place alone was 7-21% slower; docs/BENCHMARKS.md)
    backward_in_place: bool = True
    # with backward_in_place: each step issues its two independent products (S and dP) back
    # to back, and computes P (and, in dK/dV, starts dV += P^T dO) while dP's wgmma runs
    backward_overlap: bool = True
    # forward and dQ under a causal mask: start the longest table rows first (program_tiles)
    largest_first: bool = True
    # forward at block 128: FA3's ping-pong between the two compute warpgroups (a barrier
    # makes one's S = Q K^T and P V products run while the other computes its softmax).
    # None: on exactly when forward_registers is (32k dense forward on the H200, session 10:
    # 6.20 -> 5.63 ms at head_dim 64, 8.65 -> 8.31 at 128 with registers; without them it
    # was slower at 64, 7.26 vs 6.52 ms, and equal at 128)
    forward_pingpong: bool | None = None
    # forward: P as wgmma's register operand and O rescaled in its accumulator in place (FA3)
    # instead of P through shared memory into a fresh accumulator. GPU only: the interpreter
    # runs neither form, so it is tested on the H200 (marked gpu) against the reference.
    # None: on the GPU, off in the interpreter (32k dense forward 6.52 -> 6.20 ms at
    # head_dim 64, 8.89 -> 8.65 at 128)
    forward_registers: bool | None = None
    # backward as one kernel (kernel_mgpu_fused_bwd.py: five products a tile, dQ added
    # across key blocks by TMA reduce-add) instead of the dQ and dK/dV kernels (seven; the
    # three fields above shape those); on the H200 the dense pattern goes from 0.56-0.59x
    # cuDNN to 0.69-0.70x, 32k at 90% from 5.02x to 5.84x (docs/BENCHMARKS.md)
    fused_backward: bool = True
    # its TMA ring depth, in 64-row (Q + dO) query steps; None: 3 at head_dim 64 (dense
    # pattern 0.82x -> 0.86x cuDNN), 2 above (3 is slower with the split, and does not fit
    # without it at block 128)
    fused_steps: int | None = None
    # fused, two warpgroups: each computes half of dQ's columns from both warpgroups' dS^T
    # (a barrier between them every step) instead of all columns from its own keys: half
    # the reduce-add traffic, the staging tile and the dQ accumulator (needs head_dim / 2 a
    # multiple of 64; otherwise the own-keys form runs). 0.64x -> 0.70x dense at block 128
    fused_split_dq: bool = True
    # fused: P^T and dS^T as the register operands of the dV and dK products (FA3; dS^T is
    # still staged for dQ's). GPU only, like forward_registers. None: on the GPU at head_dim
    # 64 (32k dense backward 14.4 -> 13.4 ms), off at 128, where ptxas spills more with
    # them at 240 registers and they are no faster (session 11, with the diagonal-only
    # causal mask: 288 against 228 bytes, forward + backward 32.0 against 32.2 ms;
    # session 10, before it: 38.3 ms at best against 35.8)
    backward_registers: bool | None = None
    # fused: registers of the memory warpgroup, which only issues TMAs; the two compute
    # warpgroups share the rest, (512 - n) / 2 each rounded down to 8. None: 24 above
    # head_dim 64, as FA3, which gives them 240 instead of the 232 that 40 leaves (ptxas
    # spills 352 -> 300 bytes per thread, 32k dense forward + backward 40.1 -> 35.8 ms at
    # 128, session 10); 40 at 64, where 24 spills in the memory warpgroup and measured
    # slower (19.0 vs 19.7 ms)
    backward_memory_registers: int | None = None
    # forward and fused backward: False compiles them with Pallas's unsafe_no_auto_barriers,
    # so no warpgroup barrier is added before and after every shared-memory store (the
    # fused backward's module at head_dim 128 goes from 31 bar.sync to 9). Safe for these
    # two kernels by Pallas's two conditions: no thread both reads and writes one region
    # (threads only write P^T, dS^T, dQ, O, dK, dV staging and only read lse and delta),
    # and no thread reads committed memory and then copies over it. Each later reuse of a
    # staging tile is already behind a warpgroup barrier (TMA store waits, commit_smem) or a
    # per-thread mbarrier arrival. Off by default since session 12: on the H200 the dense
    # pattern's forward + backward went from 0.89-0.92x cuDNN to 0.93-0.96x at head_dim 128
    # (32k: 31.2 -> 29.8 ms), with the GPU tests passing (docs/BENCHMARKS.md)
    auto_barriers: bool = False

    def resolved(self, head_dim: int, interpret: bool) -> MosaicAttentionTiling:
        """This tiling with each None replaced by its measured choice for head_dim (the
        register forms off in the interpreter, which cannot run them)."""
        pick = lambda value, auto: auto if value is None else value  # noqa: E731
        forward_registers = pick(self.forward_registers, not interpret)
        return dataclasses.replace(
            self, forward_registers=forward_registers,
            forward_pingpong=pick(self.forward_pingpong, forward_registers),
            backward_registers=pick(self.backward_registers, not interpret and head_dim <= 64),
            backward_memory_registers=pick(self.backward_memory_registers,
                                           MEMORY_REGISTERS if head_dim <= 64 else 24))


def transforms(dtype) -> tuple:
    """128-byte swizzle, the layout wgmma reads: 64 16-bit elements per swizzled row."""
    itemsize = jnp.dtype(dtype).itemsize
    return plgpu.TilingTransform((8, 128 // itemsize)), plgpu.SwizzleTransform(128)


def mask_index(b, h, layout):
    """The mask's (batch, head) for program (b, h): leading sizes of 1 broadcast."""
    per_batch, per_head = layout.block_mask.shape[0] > 1, layout.block_mask.shape[1] > 1
    return (b if per_batch else 0), (h if per_head else 0)


def program_tiles(table_ref, count_ref, diagonal_ref, layout, *, rows_grow: bool = False):
    """This program's (head, block index, batch, warpgroup), its count of listed tiles, its
    pipeline steps (those tiles, then the diagonal one when causal) and its table row.

    `rows_grow`: the kernel walks table rows (forward, dQ), which under a causal mask hold
    up to i + 1 tiles for block i. Programs start in grid order (heads fastest, then blocks),
    so block i = n - 1 - (grid index) starts the longest rows first and leaves the short ones
    for the tail, where the last wave would otherwise be the longest programs alone on a few
    SMs (largest-first scheduling, as FlashAttention does for causal). The dK/dV kernel walks
    columns, whose causal length n - j already falls with j."""
    head, i, batch = (jax.lax.axis_index(a) for a in ("heads", "seq", "batch"))
    if rows_grow and layout.causal:
        i = count_ref.shape[-1] - 1 - i
    wg = jax.lax.axis_index("wg")
    mb, mh = mask_index(batch, head, layout)
    count = count_ref[mb, mh, i]
    steps = count + (diagonal_ref[mb, mh, i] if layout.causal else 0)
    return head, i, batch, wg, count, steps, table_ref.at[mb, mh, i]


def causal_mask(s, is_diagonal, row_offset: int | jax.Array, transposed: bool,
                col_offset: int | jax.Array = 0):
    """On the diagonal step only, hide key c from query r when c > r (indices within the
    block; this warpgroup's rows start at `row_offset`, the tile's columns at `col_offset`).
    `transposed`: s is keys x queries (dK/dV).

    A branch taken on the diagonal step only, not a select on every step (with a limit out
    of reach off the diagonal): on the H200 that took the 32k dense causal forward +
    backward from 36.1 to 32.3 ms at head_dim 128 (the fused backward's ptxas spills from
    300 to 228 bytes per thread) and from 19.4 to 18.7 ms at 64 (docs/BENCHMARKS.md)."""
    def hide(s):
        rows = jax.lax.broadcasted_iota(jnp.int32, s.shape, 0) + row_offset
        cols = jax.lax.broadcasted_iota(jnp.int32, s.shape, 1) + col_offset
        query, key = (cols, rows) if transposed else (rows, cols)
        return jnp.where(key <= query, s, MASK_VALUE)

    return jax.lax.cond(is_diagonal, hide, lambda s: s, s)


def listed_block(table_ref, count, diagonal_block, step):
    """The block of a pipeline step: the table's entries first, then the diagonal."""
    # step < count + diagonal <= row length, so the table read is in bounds either way
    return jnp.where(step < count, table_ref[step], diagonal_block)


def matmul(a_smem, b_smem, shape) -> jax.Array:
    """a @ b on wgmma into a fresh fp32 accumulator (both operands in shared memory)."""
    def scope(acc_ref):
        plgpu.wgmma(acc_ref, a_smem, b_smem)
        return acc_ref[...]

    return pl.run_scoped(scope, plgpu.ACC(shape, jnp.float32))


def stage(smem, value) -> None:
    """Registers -> shared memory, visible to the next wgmma (the async proxy)."""
    smem[...] = value.astype(smem.dtype)
    plgpu.commit_smem()


def compiler_params(auto_barriers: bool = True) -> plgpu.CompilerParams:
    """Warpgroup semantics, fast approximate exp2; see MosaicAttentionTiling.auto_barriers
    (True here: the two-kernel backward keeps Pallas's barriers, its kernels were not
    checked against the two conditions)."""
    return plgpu.CompilerParams(approx_math=True, unsafe_no_auto_barriers=not auto_barriers,
                                lowering_semantics=plgpu.LoweringSemantics.Warpgroup)


def launch(body, out_shape, scratch, *, grid, compute_wgs: int, interpret: bool,
           auto_barriers: bool = True):
    params = compiler_params(auto_barriers)
    return plgpu.kernel(body, out_type=out_shape, scratch_types=scratch, grid=grid,
                        grid_names=("heads", "seq", "batch"), num_threads=compute_wgs + 1,
                        thread_name="wg", compiler_params=params,
                        interpret=plgpu.InterpretGPUParams() if interpret else None)


def forward(q, k, v, layout, *, block: int, scale: float, interpret: bool = False,
            tiling: MosaicAttentionTiling | None = None):
    """(O in q's dtype, base-2 lse B x H x T in fp32), as kernel.forward."""
    b, t, h, d = q.shape
    tiling = (tiling or MosaicAttentionTiling()).resolved(d, interpret)
    group = h // k.shape[2]
    wgs = block // ROWS
    qk_scale = scale * LOG2E
    swizzled = transforms(q.dtype)

    pingpong = tiling.forward_pingpong and wgs == 2
    registers = tiling.forward_registers  # GPU only: api.check refuses it interpreted

    def body(table_ref, count_ref, diagonal_ref, q_ref, k_ref, v_ref, o_ref, lse_ref,
             qo_smem2, p_smem2, lse_smem2, q_barriers, turn):
        head, i, batch, wg, count, steps, row_table = program_tiles(
            table_ref, count_ref, diagonal_ref, layout, rows_grow=tiling.largest_first)

        def take_turns():  # both warpgroups arrive once per phase: they alternate
            plgpu.barrier_arrive(turn)
            plgpu.barrier_wait(turn)

        def compute(pipeline):
            qo_smem, lse_smem = qo_smem2.at[wg], lse_smem2.at[wg]
            rows = (batch, pl.ds(i * block + wg * ROWS, ROWS), head)
            plgpu.copy_gmem_to_smem(q_ref.at[rows], qo_smem, q_barriers.at[wg])
            plgpu.barrier_wait(q_barriers.at[wg])
            if pingpong:  # warpgroup 1 starts one phase behind, warpgroup 0 ends one later
                pl.when(wg == 1)(take_turns)
            acc, m, l = pipeline((jnp.zeros((ROWS, d), jnp.float32),
                                  jnp.full((ROWS,), -jnp.inf, jnp.float32),
                                  jnp.zeros((ROWS,), jnp.float32)))
            if pingpong:
                pl.when(wg == 0)(take_turns)
            l = jnp.maximum(l, 1.0)  # 0 only on an empty row, where acc = 0 and m = -inf
            qo_smem[...] = (acc / l[:, None]).astype(qo_smem.dtype)
            lse_smem[...] = m + jnp.log2(l)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(qo_smem, o_ref.at[rows])
            plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[batch, head, rows[1]])
            plgpu.wait_smem_to_gmem(0)

        def step(indices, k_smem, v_smem, k_consumed, v_consumed, carry):
            acc, m, l = carry
            qo_smem = qo_smem2.at[wg]

            if pingpong:
                def scores(acc_ref):
                    plgpu.wgmma(acc_ref, qo_smem, k_smem.transpose((1, 0)))
                    take_turns()  # the other's softmax starts: its products are issued
                    return acc_ref[...]

                s = pl.run_scoped(scores, plgpu.ACC((ROWS, block), jnp.float32))
            else:
                s = matmul(qo_smem, k_smem.transpose((1, 0)), (ROWS, block))
            plgpu.barrier_arrive(k_consumed)
            s = s * qk_scale
            if layout.causal:
                s = causal_mask(s, indices[0] == count, wg * ROWS, transposed=False)
            m_new = jnp.maximum(m, s.max(axis=1))
            alpha = jnp.exp2(m - m_new)
            p = jnp.exp2(s - m_new[:, None])
            l = l * alpha + p.sum(axis=1)
            if registers:  # FA3's form: P from registers, O rescaled and added in place
                p16 = p.astype(q.dtype)
                if pingpong:
                    take_turns()
                acc = acc * alpha[:, None]

                def add_pv(acc_ref):
                    plgpu.wgmma(acc_ref, p16, v_smem)

                acc = pl.run_state(add_pv)(plgpu.ACC.init(acc))
                plgpu.barrier_arrive(v_consumed)
                return acc, m_new, l
            stage(p_smem2.at[wg], p)
            if pingpong:
                take_turns()  # softmax done; the tensor cores are ours once the other's is
            acc = acc * alpha[:, None] + matmul(p_smem2.at[wg], v_smem, acc.shape)
            plgpu.barrier_arrive(v_consumed)
            return acc, m_new, l

        def kv_index(s):
            return listed_block(row_table, count, i, s), 0

        pipeline = plgpu.emit_pipeline_warp_specialized(
            step, grid=(steps,), max_concurrent_steps=tiling.forward_steps,
            num_compute_wgs=wgs, memory_registers=MEMORY_REGISTERS, wg_axis="wg",
            manual_consumed_barriers=True, compute_context=compute,
            in_specs=[plgpu.BlockSpec((block, d), kv_index, transforms=swizzled)] * 2)
        g = jax.lax.div(head, group)
        pipeline(k_ref.at[batch, :, g, :], v_ref.at[batch, :, g, :])

    scratch = [plgpu.SMEM((wgs, ROWS, d), q.dtype, transforms=swizzled),
               plgpu.SMEM((wgs, ROWS, block), q.dtype, transforms=swizzled),
               plgpu.SMEM((wgs, ROWS), jnp.float32),
               plgpu.Barrier(num_barriers=wgs),
               plgpu.Barrier(num_arrivals=wgs)]  # ping-pong turns
    out_shape = (jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, h, t), jnp.float32))
    return launch(body, out_shape, scratch, grid=(h, t // block, b), compute_wgs=wgs,
                  interpret=interpret, auto_barriers=tiling.auto_barriers)(
        layout.q_table, layout.q_count, layout.diagonal, q, k, v)
