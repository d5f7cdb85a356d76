"""Grouped GEMM: the reference's gradients equal autodiff of jax.lax.ragged_dot (with empty
groups and padding rows); the Mosaic GPU path equals the reference (GPU only)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.grouped_gemm import grouped_matmul, reference


def _inputs(m, k, n, sizes, dtype, seed):
    keys = jax.random.split(jax.random.key(seed), 3)
    lhs = jax.random.normal(keys[0], (m, k), jnp.float32).astype(dtype)
    rhs = jax.random.normal(keys[1], (len(sizes), k, n), jnp.float32).astype(dtype)
    dout = jax.random.normal(keys[2], (m, n), jnp.float32).astype(dtype)
    return lhs, rhs, jnp.asarray(sizes, jnp.int32), dout


@pytest.mark.parametrize("sizes", [[3, 0, 5, 2], [10, 0, 0, 0], [2, 2, 2, 1]],
                         ids=["empty-group", "one-group", "padding-rows"])
def test_reference_gradients_equal_ragged_dot_autodiff(sizes):
    lhs, rhs, sizes, dout = _inputs(10, 8, 6, sizes, jnp.float32, seed=len(sizes))
    out, vjp = jax.vjp(lambda a, b: jax.lax.ragged_dot(a, b, sizes), lhs, rhs)
    dlhs, drhs = vjp(dout)
    np.testing.assert_allclose(grouped_matmul(lhs, rhs, sizes), out, rtol=1e-6)
    np.testing.assert_allclose(reference.input_grad(dout, rhs, sizes), dlhs, rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(reference.weight_grad(lhs, dout, sizes), drhs, rtol=1e-5,
                               atol=1e-5)
    rows = int(np.sum(sizes))
    np.testing.assert_array_equal(np.asarray(out)[rows:], 0.0)  # padding rows are zero


@pytest.mark.gpu
@pytest.mark.parametrize("m, k, n, groups", [(4096, 1024, 2048, 8), (8192, 512, 1408, 64)])
def test_gpu_pallas_grouped_gemm_matches_the_reference(m, k, n, groups):
    rng = np.random.default_rng(groups)
    cuts = np.sort(rng.integers(0, m, groups - 1))
    sizes = np.diff(np.concatenate([[0], cuts, [m]]))
    lhs, rhs, sizes, dout = _inputs(m, k, n, sizes, jnp.bfloat16, seed=groups)

    def run(implementation):
        out, vjp = jax.vjp(lambda a, b: grouped_matmul(a, b, sizes, implementation), lhs, rhs)
        return (out, *vjp(dout))

    for ours, ref in zip(run("pallas"), run("ragged_dot")):
        ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
        assert not np.any(np.isnan(ours))
        assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) < 1e-2
