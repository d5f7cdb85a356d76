"""The Mosaic GPU interpreter's TMA reductions (pallas_kernels/interpret_reduce.py)."""

import itertools
import typing

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.experimental.mosaic import gpu as mgpu
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.interpret_reduce import COMBINE, install_tma_reductions

PROGRAMS, SHAPE = 3, (64, 32)


def _kernel(reduction_op, dtype):
    """Each of PROGRAMS programs writes (program + 1) * x into one buffer that arrives
    holding `start`, by a TMA store with `reduction_op` (None: a plain store)."""
    mesh = plgpu.Mesh(grid=(PROGRAMS,), grid_names=("program",), num_threads=1,
                      thread_name="wg")
    params = plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup)

    def body(x_ref, out_ref, smem):
        program = jax.lax.axis_index("program")
        smem[...] = x_ref[...] * (program + 1).astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(smem, out_ref, reduction_op=reduction_op)
        plgpu.wait_smem_to_gmem(0)

    def kernel_body(x_ref, out_ref):
        pl.run_scoped(lambda smem: body(x_ref, out_ref, smem),
                      plgpu.SMEM(SHAPE, dtype), collective_axes="wg")

    @jax.jit
    def run(x, start):
        out = jax.new_ref(start)
        pl.kernel(kernel_body, out_type=(), mesh=mesh, compiler_params=params,
                  interpret=plgpu.InterpretGPUParams())(x, out)
        return jax.freeze(out)

    return run


def _unsigned(a):  # the value of each element read as unsigned 32-bit, in Python's int64
    return np.asarray(a).astype(np.int64) % 2**32


# an element at a time, written apart from the module's numpy forms (PTX's semantics)
REFERENCE = {
    "add": lambda c, v: c + v,
    "min": min,
    "max": max,
    "smin": min,
    "smax": max,
    "umin": lambda c, v: min(c % 2**32, v % 2**32),
    "umax": lambda c, v: max(c % 2**32, v % 2**32),
    "inc": lambda c, v: 0 if c % 2**32 >= v % 2**32 else c % 2**32 + 1,
    "dec": lambda c, v: v % 2**32 if c % 2**32 == 0 or c % 2**32 > v % 2**32
    else c % 2**32 - 1,
    "and": lambda c, v: c & v,
    "or": lambda c, v: c | v,
    "xor": lambda c, v: c ^ v,
}


def test_reduce_add_sums_every_program_into_the_destination_and_plain_stores_still_store():
    install_tma_reductions()
    install_tma_reductions()  # idempotent: a second patch would add twice
    keys = jax.random.split(jax.random.key(0))
    x = jax.random.normal(keys[0], SHAPE, jnp.float32)
    start = jax.random.normal(keys[1], SHAPE, jnp.float32)
    added = np.asarray(_kernel("add", jnp.float32)(x, start))
    np.testing.assert_allclose(added, np.asarray(start + 6.0 * x), rtol=1e-6, atol=1e-6)
    stored = np.asarray(_kernel(None, jnp.float32)(x, start))  # one of the programs wins
    candidates = [np.asarray(x * float(p + 1)) for p in range(PROGRAMS)]
    assert any(np.array_equal(stored, c) for c in candidates)


@pytest.mark.parametrize("op", sorted(set(COMBINE) - {"add"}))
def test_every_tma_reduction_combines_as_the_hardware_does(op):
    """int32 tiles with negative and positive values (so the signed and unsigned forms
    differ), small enough for inc/dec to both wrap and count; inc and dec depend on the
    order the programs arrive in, so any order is accepted for them."""
    install_tma_reductions()
    keys = jax.random.split(jax.random.key(len(op)))
    low = 0 if op in ("inc", "dec") else -50
    x = jax.random.randint(keys[0], SHAPE, low, 6, jnp.int32)
    start = jax.random.randint(keys[1], SHAPE, low, 12, jnp.int32)
    got = _unsigned(_kernel(op, jnp.int32)(x, start))
    tiles = [np.asarray(x) * (p + 1) for p in range(PROGRAMS)]
    orders = itertools.permutations(tiles) if op in ("inc", "dec") else [tiles]
    fold = np.vectorize(lambda c, *vs: _fold(REFERENCE[op], int(c), vs), otypes=[np.int64])
    expected = [_unsigned(fold(np.asarray(start), *order)) for order in orders]
    assert any(np.array_equal(got, e) for e in expected), op


def _fold(combine, current, values):
    for value in values:
        current = combine(current, int(value))
    return current


def test_the_table_covers_every_reduction_mosaic_gpu_has():
    assert set(COMBINE) == set(typing.get_args(mgpu.TMAReductionOp))
