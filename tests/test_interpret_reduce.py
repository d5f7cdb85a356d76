"""The Mosaic GPU interpreter's TMA reduce-add (pallas_kernels/interpret_reduce.py)."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.interpret_reduce import install_reduce_add

PROGRAMS, SHAPE = 3, (64, 32)


def _kernel(reduction_op):
    """Each of PROGRAMS programs writes (program + 1) * x into one f32 buffer that arrives
    holding `start`, by a TMA store with `reduction_op` (None: a plain store)."""
    mesh = plgpu.Mesh(grid=(PROGRAMS,), grid_names=("program",), num_threads=1,
                      thread_name="wg")
    params = plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup)

    def body(x_ref, out_ref, smem):
        program = jax.lax.axis_index("program")
        smem[...] = x_ref[...] * (program + 1).astype(jnp.float32)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(smem, out_ref, reduction_op=reduction_op)
        plgpu.wait_smem_to_gmem(0)

    def kernel_body(x_ref, out_ref):
        pl.run_scoped(lambda smem: body(x_ref, out_ref, smem),
                      plgpu.SMEM(SHAPE, jnp.float32), collective_axes="wg")

    @jax.jit
    def run(x, start):
        out = jax.new_ref(start)
        pl.kernel(kernel_body, out_type=(), mesh=mesh, compiler_params=params,
                  interpret=plgpu.InterpretGPUParams())(x, out)
        return jax.freeze(out)

    return run


def test_reduce_add_sums_every_program_into_the_destination_and_plain_stores_still_store():
    install_reduce_add()
    install_reduce_add()  # idempotent: a second patch would add twice
    keys = jax.random.split(jax.random.key(0))
    x = jax.random.normal(keys[0], SHAPE, jnp.float32)
    start = jax.random.normal(keys[1], SHAPE, jnp.float32)
    added = np.asarray(_kernel("add")(x, start))
    np.testing.assert_allclose(added, np.asarray(start + 6.0 * x), rtol=1e-6, atol=1e-6)
    stored = np.asarray(_kernel(None)(x, start))  # every program overwrites: one of them wins
    candidates = [np.asarray(x * float(p + 1)) for p in range(PROGRAMS)]
    assert any(np.array_equal(stored, c) for c in candidates)
