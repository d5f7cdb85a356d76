"""Pallas kernels (Triton lowering) of block-sparse flash attention: forward, dQ, dK/dV.

Flash attention (online softmax, fp32 statistics) that visits only the tiles listed in the
layout tables (layout.py); dropped tiles cost nothing but their table entries. Each program
owns one b x b output tile of one (sequence, head) and loops over its table:

  forward  grid (T/b, B, H):    O[i] = softmax(Q[i] K[j]^T * scale) V[j] over kept j, and
                                the base-2 log-sum-exp of every row
  dQ       grid (T/b, B, H):    dQ[i] = sum_j dS[i, j] K[j] * scale over kept j
  dK/dV    grid (T/b, B, Hkv):  dK[j] = sum dS[i, j]^T Q[i] * scale, dV[j] = sum P^T dO[i],
                                over the kept query blocks i of every query head of the group

with P = exp2(S - lse), dS = P * (dO V^T - delta), delta = rowsum(O * dO) (computed by XLA
outside). Off-diagonal tiles are unmasked; the causal diagonal tile is processed apart (a 0-
or 1-trip loop) with the element-wise causal mask. Logits are pre-multiplied by
scale * log2(e) so the kernels use exp2.

Tiles that are read but not the program's own (K, V in the forward and dQ; Q, dO, lse, delta
in dK/dV) are passed whole and sliced with `pl.ds`; a whole-sequence block would not fit in
shared memory. Runs with `interpret=True` on CPU.

Masked rows: a query row with no kept tile gets O = 0 and lse = -inf, and no backward
program visits it, so its dQ is 0 and it adds nothing to dK or dV.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

LOG2E = math.log2(math.e)
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: exp2 gives 0, never NaN
_NT = (((1,), (1,)), ((), ()))  # A B^T
_TN = (((0,), (0,)), ((), ()))  # A^T B


def _tile(index, size: int) -> pl.Slice:
    return pl.ds(pl.multiple_of(index * size, size), size)


def _causal(s, block: int):
    """Mask a diagonal tile: query r sees keys c <= r."""
    row = jax.lax.broadcasted_iota(jnp.int32, (block, block), 0)
    col = jax.lax.broadcasted_iota(jnp.int32, (block, block), 1)
    return jnp.where(row >= col, s, MASK_VALUE)


def _mask_index(b, h, per_batch: bool, per_head: bool):
    return (b if per_batch else 0), (h if per_head else 0)


def _forward_kernel(q_table_ref, q_count_ref, diagonal_ref, q_ref, k_ref, v_ref, o_ref,
                    lse_ref, *, block, qk_scale, group, per_batch, per_head):
    i, b, h = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    mb, mh = _mask_index(b, h, per_batch, per_head)
    g = jax.lax.div(h, group)
    q = q_ref[...]

    def step(kb, carry, masked):
        acc, m, l = carry
        keys = _tile(kb, block)
        k, v = k_ref[b, keys, g, :], v_ref[b, keys, g, :]
        s = jax.lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * qk_scale
        if masked:
            s = _causal(s, block)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        l = alpha * l + jnp.sum(p, axis=1)
        acc = alpha[:, None] * acc + jnp.dot(p.astype(v.dtype), v,
                                             preferred_element_type=jnp.float32)
        return acc, m_new, l

    carry = (jnp.zeros(q.shape, jnp.float32), jnp.full((block,), -jnp.inf, jnp.float32),
             jnp.zeros((block,), jnp.float32))
    carry = jax.lax.fori_loop(
        0, q_count_ref[mb, mh, i],
        lambda c, carry: step(q_table_ref[mb, mh, i, c], carry, False), carry)
    carry = jax.lax.fori_loop(0, diagonal_ref[mb, mh, i],
                              lambda _, carry: step(i, carry, True), carry)
    acc, m, l = carry
    empty = l == 0.0  # no kept tile in this block row: output 0, lse -inf
    l_safe = jnp.where(empty, 1.0, l)
    o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, -jnp.inf, m + jnp.log2(l_safe))


def _dq_kernel(q_table_ref, q_count_ref, diagonal_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
               delta_ref, dq_ref, *, block, scale, qk_scale, group, per_batch, per_head):
    i, b, h = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    mb, mh = _mask_index(b, h, per_batch, per_head)
    g = jax.lax.div(h, group)
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]

    def step(kb, dq, masked):
        keys = _tile(kb, block)
        k, v = k_ref[b, keys, g, :], v_ref[b, keys, g, :]
        s = jax.lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * qk_scale
        if masked:
            s = _causal(s, block)
        p = jnp.exp2(s - lse[:, None])
        dp = jax.lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32)
        ds = p * (dp - delta[:, None])
        return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    dq = jax.lax.fori_loop(
        0, q_count_ref[mb, mh, i],
        lambda c, dq: step(q_table_ref[mb, mh, i, c], dq, False),
        jnp.zeros(q.shape, jnp.float32))
    dq = jax.lax.fori_loop(0, diagonal_ref[mb, mh, i], lambda _, dq: step(i, dq, True), dq)
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkdv_kernel(k_table_ref, k_count_ref, diagonal_ref, q_ref, k_ref, v_ref, do_ref,
                 lse_ref, delta_ref, dk_ref, dv_ref, *, block, scale, qk_scale, group,
                 per_batch, per_head):
    j, b, g = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    k, v = k_ref[...], v_ref[...]

    def member(n, carry):  # every query head h of this key/value head's group
        h = g * group + n
        mb, mh = _mask_index(b, h, per_batch, per_head)

        def step(qb, carry, masked):
            dk, dv = carry
            rows = _tile(qb, block)
            q, do = q_ref[b, rows, h, :], do_ref[b, rows, h, :]
            lse, delta = lse_ref[b, h, rows], delta_ref[b, h, rows]
            s = jax.lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * qk_scale
            if masked:
                s = _causal(s, block)
            p = jnp.exp2(s - lse[:, None])
            dv = dv + jax.lax.dot_general(p.astype(do.dtype), do, _TN,
                                          preferred_element_type=jnp.float32)
            dp = jax.lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32)
            ds = p * (dp - delta[:, None])
            dk = dk + jax.lax.dot_general(ds.astype(q.dtype), q, _TN,
                                          preferred_element_type=jnp.float32)
            return dk, dv

        carry = jax.lax.fori_loop(
            0, k_count_ref[mb, mh, j],
            lambda c, carry: step(k_table_ref[mb, mh, j, c], carry, False), carry)
        return jax.lax.fori_loop(0, diagonal_ref[mb, mh, j],
                                 lambda _, carry: step(j, carry, True), carry)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = jax.lax.fori_loop(0, group, member, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _whole() -> pl.BlockSpec:
    return pl.no_block_spec


def _tile_spec(block: int, d: int) -> pl.BlockSpec:
    """One (block x D) tile of a B x T x heads x D array, grid (tile, batch, head)."""
    return pl.BlockSpec((None, block, None, d), lambda i, b, h: (b, i, h, 0))


def _row_spec(block: int) -> pl.BlockSpec:
    """One block of rows of a B x H x T statistic."""
    return pl.BlockSpec((None, None, block), lambda i, b, h: (b, h, i))


def _params(num_warps: int, num_stages: int) -> pltriton.CompilerParams:
    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _statics(layout, q, k, scale):
    b, t, h, d = q.shape
    group = h // k.shape[2]
    per_batch = layout.block_mask.shape[0] > 1
    per_head = layout.block_mask.shape[1] > 1
    return dict(qk_scale=scale * LOG2E, group=group, per_batch=per_batch, per_head=per_head)


def forward(q, k, v, layout, *, block, scale, interpret, num_warps=4, num_stages=2):
    """(O, base-2 lse of shape B x H x T in fp32)."""
    b, t, h, d = q.shape
    kernel = functools.partial(_forward_kernel, block=block, **_statics(layout, q, k, scale))
    return pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((b, h, t), jnp.float32)),
        grid=(t // block, b, h),
        in_specs=[_whole()] * 3 + [_tile_spec(block, d), _whole(), _whole()],
        out_specs=(_tile_spec(block, d), _row_spec(block)),
        interpret=interpret, compiler_params=_params(num_warps, num_stages),
        name="block_sparse_attention_forward",
    )(layout.q_table, layout.q_count, layout.diagonal, q, k, v)


def backward(q, k, v, o, lse, do, layout, *, block, scale, interpret, num_warps=4,
             num_stages=2):
    """(dQ, dK, dV) from the forward's O and base-2 lse."""
    b, t, h, d = q.shape
    hkv = k.shape[2]
    statics = _statics(layout, q, k, scale)
    delta = jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do.astype(jnp.float32))
    params = _params(num_warps, num_stages)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, block=block, scale=scale, **statics),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        grid=(t // block, b, h),
        in_specs=[_whole()] * 3 + [_tile_spec(block, d), _whole(), _whole(),
                                   _tile_spec(block, d), _row_spec(block), _row_spec(block)],
        out_specs=_tile_spec(block, d),
        interpret=interpret, compiler_params=params, name="block_sparse_attention_dq",
    )(layout.q_table, layout.q_count, layout.diagonal, q, k, v, do, lse, delta)
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, block=block, scale=scale, **statics),
        out_shape=(jax.ShapeDtypeStruct(k.shape, k.dtype),
                   jax.ShapeDtypeStruct(v.shape, v.dtype)),
        grid=(t // block, b, hkv),
        in_specs=[_whole()] * 3 + [_whole(), _tile_spec(block, d), _tile_spec(block, d),
                                   _whole(), _whole(), _whole()],
        out_specs=(_tile_spec(block, d), _tile_spec(block, d)),
        interpret=interpret, compiler_params=params, name="block_sparse_attention_dkdv",
    )(layout.k_table, layout.k_count, layout.diagonal, q, k, v, do, lse, delta)
    return dq, dk, dv
