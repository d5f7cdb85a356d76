"""Block-sparse attention: the reference and the Triton-lowered Pallas kernels against
jax.grad of the plain-jnp reference on fresh random data and masks (GQA, MQA, per-head and
per-sequence masks, empty query rows, non-causal, all-dense), the reference against
jax.nn.dot_product_attention, every output element written (interpret mode leaves unwritten
outputs NaN), the layout tables, and clear errors.

The Pallas kernels run here in interpret mode with small blocks. The GPU variants
(implementation="pallas", "mosaic", "mosaic,pallas"; blocks 64 and 128) are marked `gpu` and
run on the GPU machine. The Mosaic GPU kernels' own tests (interpret mode, CUDA lowering,
their forms and tilings): tests/test_block_sparse_attention_mosaic.py.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_testing import (assert_matches_reference, dense_causal_grads, empty_rows,
                               kernel_grads, random_inputs, random_mask, reference_grads,
                               relative_error)
from pallas_kernels.block_sparse_attention import (BlockSparseAttentionError,
                                                   block_sparse_attention, build_layout,
                                                   causal_block_mask, reference)
from pallas_kernels.block_sparse_attention import kernel

# (B, T, H, Hkv, D, block, density, mask kind, causal)
CASES = [
    (1, 64, 4, 2, 16, 16, 0.5, "shared", True),  # GQA, one query block row emptied
    (2, 96, 2, 1, 32, 32, 0.6, "per_head", True),  # MQA, a mask per query head
    (2, 64, 2, 2, 16, 16, 0.5, "per_sequence_head", True),  # a mask per (sequence, head)
    (1, 64, 2, 1, 16, 16, 0.4, "shared", False),  # non-causal
    (1, 64, 2, 2, 16, 16, 1.0, "shared", True),  # every causal tile kept
]


@pytest.mark.parametrize("implementation", ["xla", "interpret"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}T{c[1]}H{c[2]}-{c[3]}D{c[4]}"
                         f"-b{c[5]}-d{c[6]}-{c[7]}-{'causal' if c[8] else 'full'}")
def test_output_and_gradients_match_the_reference(implementation, case):
    b, t, h, hkv, d, block, density, kind, causal = case
    q, k, v, do = random_inputs(b, t, h, hkv, d, jnp.float32, seed=sum(case[:6]))
    mask = random_mask(jax.random.key(t + h), kind, b, h, t // block, density)
    ours = kernel_grads(q, k, v, mask, do, block, causal, implementation)
    refs = reference_grads(q, k, v, mask, do, block, causal)
    for name, a, r in zip(("o", "dq", "dk", "dv"), ours, refs):
        assert a.dtype == jnp.float32 and a.shape == r.shape
        assert not np.any(np.isnan(np.asarray(a))), name  # every element written
        assert relative_error(a, r) < 1e-5, name
    empty = empty_rows(mask, b, h, t, block, causal)
    if density < 1:
        assert empty.any()  # the case does exercise empty rows
    o, dq = np.asarray(ours[0]), np.asarray(ours[1])
    assert np.all(o[empty] == 0.0) and np.all(dq[empty] == 0.0)


def test_reference_is_masked_softmax_attention():
    """Against jax.nn.dot_product_attention with the element mask, on rows that see a key;
    rows that see none are zero with zero gradient, and contribute nothing to dk, dv."""
    b, t, h, hkv, d, block = 2, 64, 4, 2, 16, 16
    q, k, v, do = random_inputs(b, t, h, hkv, d, jnp.float32, seed=3)
    mask = random_mask(jax.random.key(5), "per_head", b, h, t // block, 0.5)
    full = reference.element_mask(mask, block, causal=True)  # (1, H, T, T)
    o = jax.jit(reference.attention, static_argnames="block")(q, k, v, mask, block=block)
    expected = jax.jit(jax.nn.dot_product_attention)(q, k, v, mask=full)
    empty = empty_rows(mask, b, h, t, block, True)
    assert empty.any() and not empty.all()
    np.testing.assert_allclose(np.asarray(o)[~empty], np.asarray(expected)[~empty],
                               rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(o)[empty] == 0.0)
    # the empty rows' cotangents change nothing: no gradient flows through them
    grad = jax.jit(lambda do: jax.vjp(
        lambda q, k, v: reference.attention(q, k, v, mask, block=block), q, k, v)[1](do))
    grads = grad(do)
    grads_dropped = grad(jnp.where(jnp.asarray(empty)[..., None], 0.0, do))
    for g, g2 in zip(grads, grads_dropped):
        assert not np.any(np.isnan(np.asarray(g)))
        np.testing.assert_array_equal(np.asarray(g), np.asarray(g2))
    assert np.all(np.asarray(grads[0])[empty] == 0.0)


@pytest.mark.parametrize("implementation", ["xla", "interpret"])
@pytest.mark.parametrize("hkv", [2, 1])
def test_dense_causal_mask_equals_plain_causal_attention(implementation, hkv):
    b, t, h, d, block = 1, 64, 2, 16, 16
    q, k, v, do = random_inputs(b, t, h, hkv, d, jnp.float32, seed=11 + hkv)
    ones = np.ones((t // block, t // block), bool)  # above-diagonal tiles are ignored
    ours = kernel_grads(q, k, v, ones, do, block, True, implementation)
    for a, r in zip(ours, dense_causal_grads(q, k, v, do, implementation="xla")):
        assert relative_error(a, r) < 1e-5


@pytest.mark.parametrize("implementation", ["xla", "interpret"])
def test_bf16_inputs_keep_fp32_statistics(implementation):
    b, t, h, hkv, d, block = 1, 64, 4, 2, 32, 16
    q, k, v, do = random_inputs(b, t, h, hkv, d, jnp.bfloat16, seed=21)
    mask = random_mask(jax.random.key(2), "shared", b, h, t // block, 0.6)
    ours = kernel_grads(q, k, v, mask, do, block, True, implementation)
    refs = reference_grads(q, k, v, mask, do, block, True)
    for name, a, r in zip(("o", "dq", "dk", "dv"), ours, refs):
        assert a.dtype == jnp.bfloat16, name
        assert not np.any(np.isnan(np.asarray(a, np.float32))), name
        # bf16 rounding of P and dS before their matmuls and of the outputs (2^-8 relative)
        assert relative_error(a, r) < 2e-2, name


def test_a_traced_mask_under_jit():
    """A mask computed inside jit (a learned gate's) builds its tables in the graph."""
    b, t, h, hkv, d, block = 2, 64, 2, 1, 16, 16
    q, k, v, do = random_inputs(b, t, h, hkv, d, jnp.float32, seed=31)

    @jax.jit
    def f(q, k, v, scores):
        mask = scores > 0.0  # (B, H, Nq, Nk), data-dependent
        return block_sparse_attention(q, k, v, mask, block=block, implementation="interpret")

    scores = jax.random.normal(jax.random.key(4), (b, h, t // block, t // block))
    expected = jax.jit(reference.attention, static_argnames="block")(q, k, v, scores > 0.0,
                                                                     block=block)
    assert relative_error(f(q, k, v, scores), expected) < 1e-5


def test_kernel_log_sum_exp_matches_the_reference():
    b, t, h, hkv, d, block = 1, 64, 2, 1, 16, 16
    q, k, v, _ = random_inputs(b, t, h, hkv, d, jnp.float32, seed=41)
    mask = random_mask(jax.random.key(6), "shared", b, h, t // block, 0.5)
    o, lse2 = kernel.forward(q, k, v, build_layout(mask), block=block, scale=d ** -0.5,
                             interpret=True)
    o_ref, lse_ref = reference.attention_with_lse(q, k, v, mask, block=block)
    np.testing.assert_allclose(o, o_ref, rtol=1e-5, atol=1e-6)
    lse = np.asarray(lse2) / kernel.LOG2E  # the kernel keeps it in base 2
    np.testing.assert_allclose(lse, lse_ref, rtol=1e-5, atol=1e-5)  # -inf on empty rows too
    assert np.isneginf(lse).any()


def test_layout_lists_kept_tiles_and_keeps_the_diagonal_apart():
    mask = np.array([[1, 1, 0, 1],
                     [0, 0, 1, 1],
                     [1, 0, 1, 0],
                     [1, 1, 0, 0]], bool)
    layout = build_layout(mask)  # causal: the upper triangle is dropped
    assert isinstance(layout.q_table, np.ndarray)  # numpy in, numpy constants out
    np.testing.assert_array_equal(layout.block_mask[0, 0], np.tril(mask))
    np.testing.assert_array_equal(layout.diagonal[0, 0], [1, 0, 1, 0])
    np.testing.assert_array_equal(layout.q_count[0, 0], [0, 0, 1, 2])
    np.testing.assert_array_equal(layout.q_table[0, 0, 2, :1], [0])
    np.testing.assert_array_equal(layout.q_table[0, 0, 3, :2], [0, 1])
    np.testing.assert_array_equal(layout.k_count[0, 0], [2, 1, 0, 0])
    np.testing.assert_array_equal(layout.k_table[0, 0, 0, :2], [2, 3])
    np.testing.assert_array_equal(layout.k_table[0, 0, 1, :1], [3])
    full = build_layout(jnp.asarray(mask), causal=False)
    np.testing.assert_array_equal(full.diagonal, 0)
    np.testing.assert_array_equal(full.q_count[0, 0], mask.sum(1))
    np.testing.assert_array_equal(full.k_table[0, 0, 3, :2], [0, 1])
    np.testing.assert_array_equal(causal_block_mask(3), np.tril(np.ones((3, 3), bool)))


@pytest.mark.parametrize("change, needle", [
    (dict(mask=np.ones((3, 3), bool)), "block mask has shape"),
    (dict(mask=np.ones((3, 4, 4), bool)), "block mask has shape"),  # 3 heads for H = 4
    (dict(mask=np.ones((4,), bool)), "must be an array of shape"),
    (dict(block=24), "not a multiple of block"),
    (dict(hkv=3), "not a multiple of 3 key/value heads"),
    (dict(dtype=jnp.int32), "dtype"),
    (dict(implementation="cuda"), "implementation must be one of"),
    (dict(block=8, mask=np.ones((8, 8), bool)), "power-of-two block >= 16"),
    (dict(d=24), "power-of-two head_dim"),
    (dict(mask=build_layout(np.ones((4, 4), bool), causal=False)), "rebuild it"),
    (dict(implementation="mosaic,pallas,pallas"), "two kernel ones for forward,backward"),
    (dict(implementation="xla,pallas"), "two kernel ones for forward,backward"),
    (dict(implementation="mosaic_interpret", block=64, mask=np.ones((1, 1), bool), d=64),
     "bfloat16 or float16"),
    (dict(implementation="mosaic_interpret,interpret", dtype=jnp.bfloat16, d=64),
     "blocks 64 and 128"),
    (dict(implementation="mosaic", dtype=jnp.bfloat16, block=64, mask=np.ones((1, 1), bool),
          d=32), "head_dim 64 or 128"),
])
def test_bad_input_is_a_clear_error(change, needle):
    p = dict(mask=np.ones((4, 4), bool), block=16, hkv=2, dtype=jnp.float32,
             implementation="interpret", d=16)
    p.update(change)
    q = jnp.ones((1, 64, 4, p["d"]), p["dtype"])
    kv = jnp.ones((1, 64, p["hkv"], p["d"]), p["dtype"])
    with pytest.raises(BlockSparseAttentionError, match=needle):
        block_sparse_attention(q, kv, kv, p["mask"], block=p["block"],
                               implementation=p["implementation"])


GPU_IMPLEMENTATIONS = ["pallas", "mosaic", "mosaic,pallas"]  # the last: forward, backward


@pytest.mark.gpu
@pytest.mark.parametrize("implementation", GPU_IMPLEMENTATIONS)
@pytest.mark.parametrize("block", [64, 128])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("hkv", [4, 2, 1])
def test_gpu_kernels_match_the_reference(implementation, block, d, hkv):
    b, t, h = 2, 1024, 4
    q, k, v, do = random_inputs(b, t, h, hkv, d, jnp.bfloat16, seed=block + d + hkv)
    mask = random_mask(jax.random.key(block + hkv), "per_head", b, h, t // block, 0.4)
    ours = kernel_grads(q, k, v, mask, do, block, True, implementation)
    refs = reference_grads(q, k, v, mask, do, block, True)
    assert_matches_reference(ours, refs, 2e-2)
    empty = empty_rows(mask, b, h, t, block, True)
    assert np.all(np.asarray(ours[0], np.float32)[empty] == 0.0)


@pytest.mark.gpu
@pytest.mark.parametrize("implementation", GPU_IMPLEMENTATIONS)
@pytest.mark.parametrize("block", [64, 128])
def test_gpu_dense_pattern_matches_cudnn(implementation, block):
    b, t, h, hkv, d = 2, 2048, 8, 2, 128
    q, k, v, do = random_inputs(b, t, h, hkv, d, jnp.bfloat16, seed=block)
    ours = kernel_grads(q, k, v, causal_block_mask(t // block), do, block, True, implementation)
    for a, r in zip(ours, dense_causal_grads(q, k, v, do)):
        assert relative_error(a, r) < 2e-2
