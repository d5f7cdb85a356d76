"""Block-sparse attention: every implementation against jax.grad of the plain-jnp reference
on fresh random data and masks (GQA, MQA, per-head and per-sequence masks, empty query rows,
non-causal, all-dense), the reference against jax.nn.dot_product_attention, every output
element written (interpret mode leaves unwritten outputs NaN), and clear errors.

The Pallas kernels run here in interpret mode with small blocks, the Mosaic GPU kernels under
Mosaic GPU's interpret mode (blocks 64 and 128, head_dim 64: what wgmma takes) and are also
lowered for CUDA on this CPU (which checks what the Mosaic lowering accepts, not numbers).
The GPU variants (implementation="pallas", "mosaic", "mosaic,pallas"; blocks 64 and 128) are
marked `gpu` and run on the GPU machine.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.block_sparse_attention import (BlockSparseAttentionError,
                                                   block_sparse_attention, build_layout,
                                                   causal_block_mask, reference)
from pallas_kernels.block_sparse_attention import kernel, kernel_mgpu

# (B, T, H, Hkv, D, block, density, mask kind, causal)
CASES = [
    (1, 64, 4, 2, 16, 16, 0.5, "shared", True),  # GQA, one query block row emptied
    (2, 96, 2, 1, 32, 32, 0.6, "per_head", True),  # MQA, a mask per query head
    (2, 64, 2, 2, 16, 16, 0.5, "per_sequence_head", True),  # a mask per (sequence, head)
    (1, 64, 2, 1, 16, 16, 0.4, "shared", False),  # non-causal
    (1, 64, 2, 2, 16, 16, 1.0, "shared", True),  # every causal tile kept
]


def _mask(key, kind, b, h, n, density):
    shape = {"shared": (n, n), "per_head": (h, n, n), "per_sequence_head": (b, h, n, n)}[kind]
    mask = jax.random.uniform(key, shape) < density
    if density < 1:  # an empty query block row (in the causal part: row 1 has 2 tiles)
        mask = mask.at[..., 1, :].set(False)
    return mask


def _inputs(b, t, h, hkv, d, dtype, seed):
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (b, t, h, d), jnp.float32).astype(dtype)
    k = jax.random.normal(keys[1], (b, t, hkv, d), jnp.float32).astype(dtype)
    v = jax.random.normal(keys[2], (b, t, hkv, d), jnp.float32).astype(dtype)
    do = jax.random.normal(keys[3], (b, t, h, d), jnp.float32).astype(dtype)
    return q, k, v, do


def _reference_grads(q, k, v, mask, do, block, causal):
    """jax.vjp of the plain reference, in float32."""
    @jax.jit
    def run(q, k, v, mask, do):
        f = lambda q, k, v: reference.attention(q, k, v, mask, block=block, causal=causal)  # noqa
        o, vjp = jax.vjp(f, q, k, v)
        return (o, *vjp(do))

    up = lambda a: a.astype(jnp.float32)  # noqa: E731
    return run(up(q), up(k), up(v), mask, up(do))


def _grads(q, k, v, mask_or_layout, do, block, causal, implementation, mosaic=None):
    @jax.jit
    def run(q, k, v, do):
        def f(q, k, v):
            return block_sparse_attention(q, k, v, mask_or_layout, block=block, causal=causal,
                                          implementation=implementation, mosaic=mosaic)
        o, vjp = jax.vjp(f, q, k, v)
        return (o, *vjp(do))

    return run(q, k, v, do)


def _relative_error(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def _empty_rows(mask, b, h, t, block, causal):
    """(B, T, H) bool: query rows with no visible key."""
    full = np.asarray(reference.element_mask(mask, block, causal))  # (Bm, Hm, T, T)
    empty = ~full.any(-1)  # (Bm, Hm, T)
    return np.broadcast_to(np.moveaxis(empty, 1, 2), (b, t, h))


@pytest.mark.parametrize("implementation", ["xla", "interpret"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}T{c[1]}H{c[2]}-{c[3]}D{c[4]}"
                         f"-b{c[5]}-d{c[6]}-{c[7]}-{'causal' if c[8] else 'full'}")
def test_output_and_gradients_match_the_reference(implementation, case):
    b, t, h, hkv, d, block, density, kind, causal = case
    q, k, v, do = _inputs(b, t, h, hkv, d, jnp.float32, seed=sum(case[:6]))
    mask = _mask(jax.random.key(t + h), kind, b, h, t // block, density)
    ours = _grads(q, k, v, mask, do, block, causal, implementation)
    refs = _reference_grads(q, k, v, mask, do, block, causal)
    for name, a, r in zip(("o", "dq", "dk", "dv"), ours, refs):
        assert a.dtype == jnp.float32 and a.shape == r.shape
        assert not np.any(np.isnan(np.asarray(a))), name  # every element written
        assert _relative_error(a, r) < 1e-5, name
    empty = _empty_rows(mask, b, h, t, block, causal)
    if density < 1:
        assert empty.any()  # the case does exercise empty rows
    o, dq = np.asarray(ours[0]), np.asarray(ours[1])
    assert np.all(o[empty] == 0.0) and np.all(dq[empty] == 0.0)


def test_reference_is_masked_softmax_attention():
    """Against jax.nn.dot_product_attention with the element mask, on rows that see a key;
    rows that see none are zero with zero gradient, and contribute nothing to dk, dv."""
    b, t, h, hkv, d, block = 2, 64, 4, 2, 16, 16
    q, k, v, do = _inputs(b, t, h, hkv, d, jnp.float32, seed=3)
    mask = _mask(jax.random.key(5), "per_head", b, h, t // block, 0.5)
    full = reference.element_mask(mask, block, causal=True)  # (1, H, T, T)
    o = jax.jit(reference.attention, static_argnames="block")(q, k, v, mask, block=block)
    expected = jax.jit(jax.nn.dot_product_attention)(q, k, v, mask=full)
    empty = _empty_rows(mask, b, h, t, block, True)
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
    q, k, v, do = _inputs(b, t, h, hkv, d, jnp.float32, seed=11 + hkv)
    ones = np.ones((t // block, t // block), bool)  # above-diagonal tiles are ignored
    ours = _grads(q, k, v, ones, do, block, True, implementation)
    @jax.jit
    def plain(q, k, v, do):
        o, vjp = jax.vjp(lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation="xla"), q, k, v)
        return (o, *vjp(do))

    for a, r in zip(ours, plain(q, k, v, do)):
        assert _relative_error(a, r) < 1e-5


@pytest.mark.parametrize("implementation", ["xla", "interpret"])
def test_bf16_inputs_keep_fp32_statistics(implementation):
    b, t, h, hkv, d, block = 1, 64, 4, 2, 32, 16
    q, k, v, do = _inputs(b, t, h, hkv, d, jnp.bfloat16, seed=21)
    mask = _mask(jax.random.key(2), "shared", b, h, t // block, 0.6)
    ours = _grads(q, k, v, mask, do, block, True, implementation)
    refs = _reference_grads(q, k, v, mask, do, block, True)
    for name, a, r in zip(("o", "dq", "dk", "dv"), ours, refs):
        assert a.dtype == jnp.bfloat16, name
        assert not np.any(np.isnan(np.asarray(a, np.float32))), name
        # bf16 rounding of P and dS before their matmuls and of the outputs (2^-8 relative)
        assert _relative_error(a, r) < 2e-2, name


def test_a_traced_mask_under_jit():
    """A mask computed inside jit (a learned gate's) builds its tables in the graph."""
    b, t, h, hkv, d, block = 2, 64, 2, 1, 16, 16
    q, k, v, do = _inputs(b, t, h, hkv, d, jnp.float32, seed=31)

    @jax.jit
    def f(q, k, v, scores):
        mask = scores > 0.0  # (B, H, Nq, Nk), data-dependent
        return block_sparse_attention(q, k, v, mask, block=block, implementation="interpret")

    scores = jax.random.normal(jax.random.key(4), (b, h, t // block, t // block))
    expected = jax.jit(reference.attention, static_argnames="block")(q, k, v, scores > 0.0,
                                                                     block=block)
    assert _relative_error(f(q, k, v, scores), expected) < 1e-5


def test_kernel_log_sum_exp_matches_the_reference():
    b, t, h, hkv, d, block = 1, 64, 2, 1, 16, 16
    q, k, v, _ = _inputs(b, t, h, hkv, d, jnp.float32, seed=41)
    mask = _mask(jax.random.key(6), "shared", b, h, t // block, 0.5)
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
    q, k, v, do = _inputs(b, t, h, hkv, d, jnp.bfloat16, seed=block + d + hkv)
    mask = _mask(jax.random.key(block + hkv), "per_head", b, h, t // block, 0.4)
    ours = _grads(q, k, v, mask, do, block, True, implementation)
    refs = _reference_grads(q, k, v, mask, do, block, True)
    for name, a, r in zip(("o", "dq", "dk", "dv"), ours, refs):
        assert not np.any(np.isnan(np.asarray(a, np.float32))), name
        assert _relative_error(a, r) < 2e-2, name
    empty = _empty_rows(mask, b, h, t, block, True)
    assert np.all(np.asarray(ours[0], np.float32)[empty] == 0.0)


@pytest.mark.gpu
@pytest.mark.parametrize("overlap", [False, True], ids=["in_place", "overlap"])
@pytest.mark.parametrize("block, d", [(64, 64), (128, 128)])
@pytest.mark.parametrize("hkv", [4, 1])
def test_gpu_mosaic_backward_in_place_matches_the_reference(block, d, hkv, overlap):
    """backward_in_place: dQ, dK, dV accumulate in the wgmma accumulators; on the GPU the
    waits before freeing K, Q, dO and the P/dS buffer are real (the interpreter runs wgmma
    synchronously), so this is where a missing wait would show."""
    b, t, h = 2, 1024, 4
    q, k, v, do = _inputs(b, t, h, hkv, d, jnp.bfloat16, seed=block + d + hkv + 1)
    mask = _mask(jax.random.key(block + hkv + 1), "per_head", b, h, t // block, 0.4)
    tiling = kernel_mgpu.MosaicAttentionTiling(fused_backward=False, backward_in_place=True,
                                               backward_overlap=overlap)
    ours = _grads(q, k, v, mask, do, block, True, "mosaic", mosaic=tiling)
    refs = _reference_grads(q, k, v, mask, do, block, True)
    for name, a, r in zip(("o", "dq", "dk", "dv"), ours, refs):
        assert not np.any(np.isnan(np.asarray(a, np.float32))), name
        assert _relative_error(a, r) < 2e-2, name


@pytest.mark.gpu
@pytest.mark.parametrize("steps", [2, 3])
# the split applies at block 128 with head_dim 128 only (elsewhere both forms are one kernel)
@pytest.mark.parametrize("block, d, split", [(64, 64, False), (64, 128, False),
                                             (128, 64, False), (128, 128, False),
                                             (128, 128, True)])
@pytest.mark.parametrize("kind, density, causal, hkv", [("per_head", 0.4, True, 4),
                                                        ("shared", 1.0, True, 1),
                                                        ("per_sequence_head", 0.3, False, 2)])
def test_gpu_mosaic_fused_backward_matches_the_reference(block, d, hkv, steps, kind, density,
                                                         causal, split):
    """The fused backward on the hardware: real TMA reduce-adds from every key block into
    dQ (which must arrive zeroed), real waits before the staging tile is rewritten, the
    barrier between the warpgroups of split_dq, and the shared-memory budget of each ring depth (3 may not fit at block 128: skipped)."""
    b, t, h = 2, 1024, 4
    q, k, v, do = _inputs(b, t, h, hkv, d, jnp.bfloat16, seed=block + d + hkv + steps)
    mask = _mask(jax.random.key(block + hkv + 3), kind, b, h, t // block, density)
    tiling = kernel_mgpu.MosaicAttentionTiling(fused_backward=True, fused_steps=steps,
                                               fused_split_dq=split)
    try:
        ours = _grads(q, k, v, mask, do, block, causal, "mosaic", mosaic=tiling)
    except Exception as e:  # noqa: BLE001 - only the shared-memory overflow may skip
        if "shared memory" in str(e).lower() or "smem" in str(e).lower():
            pytest.skip(f"ring depth {steps} does not fit: {str(e)[:200]}")
        raise
    refs = _reference_grads(q, k, v, mask, do, block, causal)
    for name, a, r in zip(("o", "dq", "dk", "dv"), ours, refs):
        assert not np.any(np.isnan(np.asarray(a, np.float32))), name
        assert _relative_error(a, r) < 2e-2, name
    empty = _empty_rows(mask, b, h, t, block, causal)
    assert np.all(np.asarray(ours[1], np.float32)[empty] == 0.0)  # dQ: zeroed, never added


# the forward's optional forms: warpgroups taking turns; P from registers, O in place (GPU
# only); both
FORWARD_FORMS = {"pingpong": dict(forward_pingpong=True),
                 "registers": dict(forward_registers=True),
                 "registers_pingpong": dict(forward_registers=True, forward_pingpong=True),
                 # and the fused backward's register operands (GPU only too)
                 "all_registers": dict(forward_registers=True, backward_registers=True)}


@pytest.mark.gpu
@pytest.mark.parametrize("form", FORWARD_FORMS)
@pytest.mark.parametrize("block, d", [(128, 64), (128, 128), (64, 128)])
@pytest.mark.parametrize("kind, density, causal, hkv", [("per_head", 0.4, True, 4),
                                                        ("per_sequence_head", 0.3, False, 1)])
def test_gpu_mosaic_forward_forms_match_the_reference(block, d, kind, density, causal, hkv,
                                                      form):
    """The forward's optional forms on the hardware: a missed ping-pong phase would hang or
    let one warpgroup's P V read another's staging; the register operand and the in-place
    rescale run only here (not in the interpreter); empty rows still give O = 0."""
    b, t, h = 2, 1024, 4
    q, k, v, do = _inputs(b, t, h, hkv, d, jnp.bfloat16, seed=d + hkv + 11)
    mask = _mask(jax.random.key(d + hkv), kind, b, h, t // block, density)
    tiling = kernel_mgpu.MosaicAttentionTiling(**FORWARD_FORMS[form])
    ours = _grads(q, k, v, mask, do, block, causal, "mosaic", mosaic=tiling)
    refs = _reference_grads(q, k, v, mask, do, block, causal)
    for name, a, r in zip(("o", "dq", "dk", "dv"), ours, refs):
        assert not np.any(np.isnan(np.asarray(a, np.float32))), name
        assert _relative_error(a, r) < 2e-2, name
    empty = _empty_rows(mask, b, h, t, block, causal)
    assert np.all(np.asarray(ours[0], np.float32)[empty] == 0.0)


@pytest.mark.gpu
@pytest.mark.parametrize("implementation", GPU_IMPLEMENTATIONS)
@pytest.mark.parametrize("block", [64, 128])
def test_gpu_dense_pattern_matches_cudnn(implementation, block):
    b, t, h, hkv, d = 2, 2048, 8, 2, 128
    q, k, v, do = _inputs(b, t, h, hkv, d, jnp.bfloat16, seed=block)
    ours = _grads(q, k, v, causal_block_mask(t // block), do, block, True, implementation)
    o, vjp = jax.vjp(lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=True, implementation="cudnn"), q, k, v)
    for a, r in zip(ours, (o, *vjp(do))):
        assert _relative_error(a, r) < 2e-2


def test_the_benchmark_runs_on_cpu_in_interpret_mode():
    from pallas_kernels.block_sparse_attention import bench

    assert bench.RUNS_AS["mosaic_fresh"] == bench.RUNS_AS["mosaic_acc"] == bench.RUNS_AS["mosaic"]
    default = kernel_mgpu.MosaicAttentionTiling()
    assert default.fused_backward and default.fused_split_dq  # measured fastest (BENCHMARKS)
    two = bench.TILINGS["mosaic_two_kernels"]
    assert not two.fused_backward and two.backward_in_place and two.backward_overlap
    assert not bench.TILINGS["mosaic_fresh"].fused_backward
    assert not bench.TILINGS["mosaic_fresh"].backward_in_place
    assert not bench.TILINGS["mosaic_acc"].backward_overlap
    assert not bench.TILINGS["mosaic_fused"].fused_split_dq
    assert bench.TILINGS["mosaic_split"].fused_split_dq and default.fused_steps is None
    assert default.largest_first and not bench.TILINGS["mosaic_in_order"].largest_first

    # --sweep's Mosaic tilings: the default and each ring depth or the dQ split varied alone
    candidates = bench.mosaic_candidates()
    assert candidates["default"] == default and len(set(candidates.values())) == 6
    for label, tiling in candidates.items():
        changed = [f for f in ("forward_steps", "fused_steps", "fused_split_dq")
                   if getattr(tiling, f) != getattr(default, f)]
        assert changed == ([] if label == "default" else [label.split("=")[0]])

    mask = bench.random_causal_mask(0, 16, 0.75)
    assert np.all(np.diag(mask)) and not np.triu(mask, 1).any()
    assert mask.sum() == round(0.25 * 16 * 17 / 2)
    rows = bench.bench_seq(64, 1, 2, 1, 16, [16], [0.5], reps=1, with_xla=True)
    assert len(rows) == 1 and rows[0]["sparsity"] == pytest.approx(0.5)
    assert rows[0]["cudnn_fb_ms"] is None  # no cuDNN on CPU
    assert rows[0]["sparse_fb_ms"] > 0 and rows[0]["xla_fb_ms"] > 0


@pytest.mark.gpu
@pytest.mark.parametrize("block", [64, 128])
def test_gpu_mosaic_non_causal_and_per_sequence_masks(block):
    b, t, h, hkv, d = 2, 1024, 4, 2, 128
    q, k, v, do = _inputs(b, t, h, hkv, d, jnp.bfloat16, seed=7 * block)
    for kind, causal in (("per_sequence_head", True), ("shared", False)):
        mask = _mask(jax.random.key(block), kind, b, h, t // block, 0.3)
        ours = _grads(q, k, v, mask, do, block, causal, "mosaic")
        refs = _reference_grads(q, k, v, mask, do, block, causal)
        for name, a, r in zip(("o", "dq", "dk", "dv"), ours, refs):
            assert _relative_error(a, r) < 2e-2, (kind, name)


# Mosaic GPU interpret mode: (B, T, H, Hkv, D, block, density, mask kind, causal, ring depth).
# Rows list 1..4 tiles: step counts below, at and above the ring depth, not multiples of it.
MOSAIC_CASES = [
    (1, 256, 4, 2, 64, 64, 0.6, "per_head", True, 2),  # GQA 2, an empty block row per head
    (1, 256, 2, 1, 128, 128, 1.0, "shared", True, 3),  # MQA, dense causal, 2 consumer wgs
    (2, 128, 2, 2, 64, 64, 0.5, "per_sequence_head", False, 2),  # non-causal, empty rows
    # block 128 at head_dim 128 with a sparse per-head mask: the fused backward's 64-row
    # query steps on and off the diagonal, its dQ split, and empty block rows
    (1, 384, 2, 1, 128, 128, 0.5, "per_head", True, 2),
]


# the backward's forms: MosaicAttentionTiling fields (two kernels with fresh accumulators, in
# place, in place with S and dP issued together; one fused kernel adding dQ by reduce-add)
BACKWARD_FORMS = {
    "fresh_acc": dict(fused_backward=False, backward_in_place=False, backward_overlap=False),
    "in_place": dict(fused_backward=False, backward_in_place=True, backward_overlap=False),
    "overlap": dict(fused_backward=False, backward_in_place=True, backward_overlap=True),
    "fused_own_keys": dict(fused_backward=True, fused_split_dq=False),
    "fused_split_dq": dict(fused_backward=True, fused_split_dq=True),  # the default
}


# the two-kernel forms before overlap are the slow suite's: overlap runs the same
# accumulators plus its own order
@pytest.mark.parametrize("form", [pytest.param(f, marks=pytest.mark.slow)
                                  if f in ("in_place", "fresh_acc") else f
                                  for f in BACKWARD_FORMS])
@pytest.mark.parametrize("case", MOSAIC_CASES, ids=lambda c: f"B{c[0]}T{c[1]}H{c[2]}-{c[3]}"
                         f"-b{c[5]}-d{c[6]}-{c[7]}-{'causal' if c[8] else 'full'}-ring{c[9]}")
def test_mosaic_kernels_in_interpret_mode_match_the_reference(case, form):
    """Forward, dQ and dK/dV of the Mosaic GPU kernels, run by Mosaic GPU's interpreter, on
    fresh random bf16 data against jax.vjp of the fp32 reference; the backward with a fresh
    accumulator per product, accumulating in place, in place with S and dP issued together,
    and fused into one kernel (dQ added across key blocks by the interpreted TMA reduce-add:
    its rows must arrive zeroed, and empty rows stay 0)."""
    b, t, h, hkv, d, block, density, kind, causal, ring = case
    q, k, v, do = _inputs(b, t, h, hkv, d, jnp.bfloat16, seed=sum(case[:6]))
    mask = _mask(jax.random.key(t + h + block), kind, b, h, t // block, density)
    # the fresh-accumulator form also starts programs in grid order; the others start the
    # longest causal rows first, so block i's program must still read and write block i
    tiling = kernel_mgpu.MosaicAttentionTiling(ring, ring, ring, **BACKWARD_FORMS[form],
                                               fused_steps=ring,
                                               largest_first=form != "fresh_acc")

    @jax.jit
    def run(q, k, v, do):
        o, vjp = jax.vjp(lambda q, k, v: block_sparse_attention(
            q, k, v, mask, block=block, causal=causal, implementation="mosaic_interpret",
            mosaic=tiling), q, k, v)
        return (o, *vjp(do))

    ours = run(q, k, v, do)
    refs = _reference_grads(q, k, v, mask, do, block, causal)
    for name, a, r in zip(("o", "dq", "dk", "dv"), ours, refs):
        assert a.dtype == jnp.bfloat16 and a.shape == r.shape, name
        assert not np.any(np.isnan(np.asarray(a, np.float32))), name  # every element written
        # bf16 P and dS before their wgmmas, bf16 outputs (and bf16 per-head dK, dV in GQA)
        assert _relative_error(a, r) < 1e-2, name
    empty = _empty_rows(mask, b, h, t, block, causal)
    assert empty.any() == (density < 1)
    o, dq = np.asarray(ours[0], np.float32), np.asarray(ours[1], np.float32)
    assert np.all(o[empty] == 0.0) and np.all(dq[empty] == 0.0)


def test_mosaic_forward_pingpong_in_interpret_mode_matches_the_reference():
    """The forward's warpgroups taking turns (forward_pingpong), interpreted: every phase of
    the turn barrier is observed by both (the interpreter raises otherwise), including a
    head with an empty block row, whose warpgroups run no step."""
    b, t, h, hkv, d, block = 1, 384, 2, 1, 64, 128
    q, k, v, _ = _inputs(b, t, h, hkv, d, jnp.bfloat16, seed=23)
    mask = np.array([[[1, 0, 0], [1, 1, 0], [0, 1, 1]],
                     [[1, 0, 0], [0, 0, 0], [1, 1, 0]]], bool)  # head 1: block row 1 empty
    tiling = kernel_mgpu.MosaicAttentionTiling(forward_pingpong=True)
    o = jax.jit(lambda q, k, v: block_sparse_attention(
        q, k, v, mask, block=block, implementation="mosaic_interpret", mosaic=tiling))(q, k, v)
    ref = reference.attention(*(x.astype(jnp.float32) for x in (q, k, v)), mask, block=block,
                              causal=True)
    assert _relative_error(o, ref) < 1e-2
    assert np.all(np.asarray(o, np.float32)[0, block:2 * block, 1] == 0.0)


@pytest.mark.parametrize("block, d", [(64, 64), (128, 128)])
def test_mosaic_register_forms_lower_for_cuda_and_refuse_the_interpreter(block, d):
    """forward_registers (P as wgmma's register operand, O rescaled in place) and the fused
    backward's backward_registers pass the Mosaic GPU lowering for sm_90 on this CPU; the
    interpreter, which runs neither construct, gets a clear error, not a wrong answer."""
    b, t, h, hkv = 1, 512, 2, 1
    q = jax.ShapeDtypeStruct((b, t, h, d), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((b, t, hkv, d), jnp.bfloat16)
    mask = np.tril(np.ones((t // block, t // block), bool))
    for form in ("registers", "registers_pingpong", "all_registers"):
        tiling = kernel_mgpu.MosaicAttentionTiling(**FORWARD_FORMS[form])
        fn = functools.partial(block_sparse_attention, block=block, implementation="mosaic",
                               mosaic=tiling)

        def fb(q, k, v, do):
            o, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, mask), q, k, v)
            return (o, *vjp(do))

        text = jax.jit(fb).trace(q, kv, kv, q).lower(lowering_platforms=("cuda",)).as_text()
        assert "mosaic_gpu" in text and "block_sparse_attention_fused_bwd" in text
    zeros = [jnp.zeros(x.shape, x.dtype) for x in (q, kv, kv)]
    with pytest.raises(BlockSparseAttentionError, match="forward_registers"):
        block_sparse_attention(*zeros, mask, block=block, implementation="mosaic_interpret",
                               mosaic=tiling)
    backward_only = kernel_mgpu.MosaicAttentionTiling(backward_registers=True)
    with pytest.raises(BlockSparseAttentionError, match="backward_registers"):
        jax.grad(lambda q: block_sparse_attention(
            q, *zeros[1:], mask, block=block, implementation="mosaic_interpret",
            mosaic=backward_only).sum())(zeros[0])


def test_one_implementation_per_pass_matches_the_reference():
    """Mosaic forward, Triton backward: both keep the same base-2 lse (-inf on empty rows),
    which the backward reads. (The Triton forward's lse is checked against the reference
    above, so the other order needs no run of its own.)"""
    implementation = "mosaic_interpret,interpret"
    b, t, h, hkv, d, block = 1, 192, 2, 1, 64, 64
    q, k, v, do = _inputs(b, t, h, hkv, d, jnp.bfloat16, seed=51)
    mask = np.array([[1, 0, 0], [0, 0, 0], [1, 1, 1]], bool)  # block row 1 empty
    ours = _grads(q, k, v, mask, do, block, True, implementation)
    for name, a, r in zip(("o", "dq", "dk", "dv"), ours,
                          _reference_grads(q, k, v, mask, do, block, True)):
        assert not np.any(np.isnan(np.asarray(a, np.float32))), name
        assert _relative_error(a, r) < 1e-2, name


@pytest.mark.parametrize("form", BACKWARD_FORMS)
@pytest.mark.parametrize("block, d", [(64, 64), (128, 128)])
def test_mosaic_kernels_lower_for_cuda_on_this_cpu(block, d, form):
    """The Pallas -> Mosaic GPU lowering of forward and backward, for the CUDA platform,
    without a GPU: catches what the lowering rejects (shapes, layouts, wgmma operands)."""
    b, t, h, hkv = 2, 1024, 4, 2
    q = jax.ShapeDtypeStruct((b, t, h, d), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((b, t, hkv, d), jnp.bfloat16)
    mask = np.asarray(jax.random.uniform(jax.random.key(0), (h, t // block, t // block)) < 0.5)

    def fb(q, k, v, do):
        o, vjp = jax.vjp(lambda q, k, v: block_sparse_attention(
            q, k, v, mask, block=block, implementation="mosaic",
            mosaic=kernel_mgpu.MosaicAttentionTiling(2, 2, 2, **BACKWARD_FORMS[form])), q, k, v)
        return (o, *vjp(do))

    text = jax.jit(fb).trace(q, kv, kv, q).lower(lowering_platforms=("cuda",)).as_text()
    # forward, dQ, dK/dV kernels; forward and the fused backward
    fused = form.startswith("fused")
    assert text.count("mosaic_gpu") >= (2 if fused else 3)
    assert ("block_sparse_attention_fused_bwd" in text) == fused
