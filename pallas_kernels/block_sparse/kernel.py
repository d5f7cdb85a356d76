"""Pallas kernels for the three products of a block-sparse linear layer.

All three use the Triton lowering (`pl.pallas_call`), which runs on any NVIDIA GPU and, with
`interpret=True`, on CPU. X, W and dY are passed whole (refs into global memory) and sliced
with `pl.ds`: a block spec over all of K would not fit in shared memory. Each program reads its
tile list from the layout's int32 tables and loops over the non-zero tiles only, accumulating
in fp32; zero tiles cost nothing but their table entries.

  forward       grid (T/bt, N/b):  Y[i, j]  = sum_{k in col_table[j]} X[i, k] W[k, j]
  input grad    grid (T/bt, K/b):  dX[i, k] = sum_{j in row_table[k]} dY[i, j] W[k, j]^T
  weight grad   grid (K/b, N/b, S): dW[k, j] = sum_t X[t, k]^T dY[t, j] if tile (k, j) is
                                   kept, else 0 (every output tile is written); the S
                                   programs of a tile each sum one range of tokens (split-K)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

_NT = (((1,), (1,)), ((), ()))  # contract the last dims: A B^T
_TN = (((0,), (0,)), ((), ()))  # contract the first dims: A^T B


def _tile(index: jax.Array, size: int) -> pl.Slice:
    return pl.ds(pl.multiple_of(index * size, size), size)


def _forward_kernel(col_table_ref, col_count_ref, x_ref, w_ref, y_ref, *, block, block_t):
    i, j = pl.program_id(0), pl.program_id(1)
    rows, cols = _tile(i, block_t), _tile(j, block)

    def body(c, acc):
        ks = _tile(col_table_ref[j, c], block)
        return acc + jnp.dot(x_ref[rows, ks], w_ref[ks, cols],
                             preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, col_count_ref[j], body,
                            jnp.zeros((block_t, block), jnp.float32))
    y_ref[...] = acc.astype(y_ref.dtype)


def _input_grad_kernel(row_table_ref, row_count_ref, dy_ref, w_ref, dx_ref, *, block, block_t):
    i, k = pl.program_id(0), pl.program_id(1)
    rows, ks = _tile(i, block_t), _tile(k, block)

    def body(c, acc):
        cols = _tile(row_table_ref[k, c], block)
        return acc + jax.lax.dot_general(dy_ref[rows, cols], w_ref[ks, cols], _NT,
                                         preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, row_count_ref[k], body,
                            jnp.zeros((block_t, block), jnp.float32))
    dx_ref[...] = acc.astype(dx_ref.dtype)


def _weight_grad_kernel(block_mask_ref, x_ref, dy_ref, dw_ref, *, block, block_t, chunks,
                        splits):
    k, j = pl.program_id(0), pl.program_id(1)
    part = pl.program_id(2) if splits > 1 else 0
    ks, cols = _tile(k, block), _tile(j, block)

    def body(t, acc):
        rows = _tile(t, block_t)
        return acc + jax.lax.dot_general(x_ref[rows, ks], dy_ref[rows, cols], _TN,
                                         preferred_element_type=jnp.float32)

    # this program's share of the token chunks (split-K over tokens); pruned tiles: no
    # work, zeros out. Integer arithmetic, not jnp.where: the Triton lowering gave the
    # where's weakly typed result an i1 type, an invalid loop bound.
    keep = jnp.minimum(block_mask_ref[k, j], 1)
    start = part * chunks // splits
    stop = start + keep * ((part + 1) * chunks // splits - start)
    acc = jax.lax.fori_loop(start, stop, body, jnp.zeros((block, block), jnp.float32))
    dw_ref[...] = acc.astype(dw_ref.dtype)


# Programs to aim for in the weight gradient: two per SM of an H100/H200 (132 SMs). Its grid
# has one program per weight tile, and a small weight (1024 x 1024 in 128-blocks: 64 tiles,
# 16 of them kept at 75% sparsity) leaves most SMs idle while each program reduces over
# every token; splitting the tokens fills them.
TARGET_PROGRAMS = 264
# fp32 partial sums of a split weight gradient; above this the split is reduced
MAX_PARTIALS_BYTES = 256 * 2**20


def weight_grad_splits(tokens: int, k: int, n: int, *, block: int, block_t: int) -> int:
    """How many token ranges the weight gradient splits into (1: none)."""
    chunks, tiles = tokens // block_t, (k // block) * (n // block)
    splits = max(1, min(chunks, TARGET_PROGRAMS // tiles))
    while splits > 1 and splits * k * n * 4 > MAX_PARTIALS_BYTES:
        splits //= 2
    return splits


def _whole() -> pl.BlockSpec:
    return pl.no_block_spec


def _params(num_warps: int, num_stages: int) -> pltriton.CompilerParams:
    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def forward(x_TxK, w_KxN, col_table, col_count, *, block, block_t, interpret, num_warps=4,
            num_stages=3):
    t, _ = x_TxK.shape
    n = w_KxN.shape[1]
    kernel = functools.partial(_forward_kernel, block=block, block_t=block_t)
    return pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((t, n), x_TxK.dtype),
        grid=(t // block_t, n // block), in_specs=[_whole()] * 4,
        out_specs=pl.BlockSpec((block_t, block), lambda i, j: (i, j)),
        interpret=interpret, compiler_params=_params(num_warps, num_stages),
        name="block_sparse_forward")(col_table, col_count, x_TxK, w_KxN)


def input_grad(dy_TxN, w_KxN, row_table, row_count, *, block, block_t, interpret, num_warps=4,
               num_stages=3):
    t, _ = dy_TxN.shape
    k = w_KxN.shape[0]
    kernel = functools.partial(_input_grad_kernel, block=block, block_t=block_t)
    return pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((t, k), dy_TxN.dtype),
        grid=(t // block_t, k // block), in_specs=[_whole()] * 4,
        out_specs=pl.BlockSpec((block_t, block), lambda i, j: (i, j)),
        interpret=interpret, compiler_params=_params(num_warps, num_stages),
        name="block_sparse_input_grad")(row_table, row_count, dy_TxN, w_KxN)


def weight_grad(x_TxK, dy_TxN, block_mask, *, block, block_t, interpret, out_dtype,
                num_warps=4, num_stages=3, splits: int = 0):
    """`splits` token ranges reduce into fp32 partial tiles summed after the kernel (0: by
    weight_grad_splits)."""
    t, k = x_TxK.shape
    n = dy_TxN.shape[1]
    chunks = t // block_t
    splits = splits or weight_grad_splits(t, k, n, block=block, block_t=block_t)
    splits = min(splits, chunks)
    kernel = functools.partial(_weight_grad_kernel, block=block, block_t=block_t,
                               chunks=chunks, splits=splits)
    if splits == 1:  # one program per tile, written in out_dtype directly
        grid, shape, dtype = (k // block, n // block), (k, n), out_dtype
        spec = pl.BlockSpec((block, block), lambda i, j: (i, j))
    else:  # fp32 partial tiles, one per token range, summed below
        grid, shape, dtype = (k // block, n // block, splits), (splits, k, n), jnp.float32
        spec = pl.BlockSpec((None, block, block), lambda i, j, s: (s, i, j))
    dw = pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct(shape, dtype), grid=grid,
        in_specs=[_whole()] * 3, out_specs=spec,
        interpret=interpret, compiler_params=_params(num_warps, num_stages),
        name="block_sparse_weight_grad" + ("" if splits == 1 else "_split"),
    )(block_mask, x_TxK, dy_TxN)
    return dw if splits == 1 else dw.sum(axis=0).astype(out_dtype)
