"""Block-sparse matmul: every implementation against jax.grad of the plain-jnp reference, on
fresh random data and masks, several shapes and densities (empty tile rows and columns,
all-dense, all-empty), every output element written (interpret mode leaves unwritten
outputs NaN), and clear errors for bad input.

The Mosaic GPU kernels run here under Mosaic GPU's interpret mode; the GPU variants
(implementation="pallas" and "mosaic") are marked `gpu` and run on the GPU machine.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.block_sparse import block_sparse_matmul, build_layout
from pallas_kernels.block_sparse import bench, kernel_mgpu, reference
from pallas_kernels.block_sparse.api import TUNED_WARP_SPECIALIZED, BlockSparseError

CASES = [  # (T, K, N, block, density, special)
    (64, 128, 128, 32, 0.5, None),
    (96, 128, 192, 32, 0.3, None),  # T not a multiple of the row tile: padded
    (128, 256, 128, 64, 0.25, "empty_rows_and_cols"),
    (64, 128, 256, 64, 1.0, None),  # fully dense mask
    (64, 128, 128, 32, 0.0, None),  # everything pruned
    (32, 64, 64, 16, 0.6, None),
]


def _inputs(t, k, n, block, density, special, dtype, seed):
    keys = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(keys[0], (t, k), jnp.float32).astype(dtype)
    w = (0.1 * jax.random.normal(keys[1], (k, n), jnp.float32)).astype(dtype)
    mask = jax.random.uniform(keys[2], (k // block, n // block)) < density
    if special == "empty_rows_and_cols":
        mask = mask.at[1, :].set(False).at[:, 0].set(False).at[0, 1].set(True)
    dy = jax.random.normal(keys[3], (t, n), jnp.float32).astype(dtype)
    return x, w, mask, dy


def _reference_grads(x, w, mask, dy, block):
    """jax.grad (through jax.vjp) of the plain masked matmul, in float32."""
    def f(x, w):
        return jnp.dot(x, w * reference.expand(mask, block, w.dtype))

    y, vjp = jax.vjp(f, x.astype(jnp.float32), w.astype(jnp.float32))
    dx, dw = vjp(dy.astype(jnp.float32))
    return y, dx, dw


def _relative_error(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


@pytest.mark.parametrize("implementation", ["xla", "interpret"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}-b{c[3]}-d{c[4]}")
def test_all_three_products_match_the_reference(implementation, case):
    t, k, n, block, density, special = case
    x, w, mask, dy = _inputs(t, k, n, block, density, special, jnp.float32, seed=sum(case[:4]))
    layout = build_layout(mask)

    def f(x, w):
        return block_sparse_matmul(x, w, layout, block=block, implementation=implementation,
                                   block_t=32)

    y, vjp = jax.vjp(f, x, w)
    dx, dw = vjp(dy)
    y_ref, dx_ref, dw_ref = _reference_grads(x, w, mask, dy, block)
    for ours, ref in ((y, y_ref), (dx, dx_ref), (dw, dw_ref)):
        assert not np.any(np.isnan(np.asarray(ours)))  # every output element written
        if np.any(np.asarray(ref) != 0):
            assert _relative_error(ours, ref) < 1e-5
        else:
            np.testing.assert_array_equal(np.asarray(ours), 0.0)
    pruned = ~np.asarray(reference.expand(mask, block, jnp.float32), bool)
    assert np.all(np.asarray(dw)[pruned] == 0.0)  # no gradient reaches pruned tiles


@pytest.mark.parametrize("splits", [1, 2, 3, 5])
def test_weight_grad_split_over_tokens_sums_every_range_once(splits):
    """Split-K weight gradient: 5 token chunks in 1, 2, 3 (uneven) or 5 ranges; a chunk
    summed twice or skipped changes dW."""
    from pallas_kernels.block_sparse import kernel

    x, _, mask, dy = _inputs(160, 64, 96, 32, 0.5, "empty_rows_and_cols", jnp.float32,
                             seed=11 + splits)
    dw = kernel.weight_grad(x, dy, mask.astype(jnp.int32), block=32, block_t=32,
                            interpret=True, out_dtype=jnp.float32, splits=splits)
    expected = reference.weight_grad(x, dy, mask, 32)
    assert _relative_error(dw, expected) < 1e-6
    pruned = ~np.asarray(reference.expand(mask, 32, jnp.float32), bool)
    assert np.all(np.asarray(dw)[pruned] == 0.0)


def test_weight_grad_splits_only_small_weights():
    from pallas_kernels.block_sparse.kernel import weight_grad_splits

    # 1024 x 1024 in 128-blocks is 64 tiles: split 4 ways to fill ~2 programs per SM
    assert weight_grad_splits(32768, 1024, 1024, block=128, block_t=64) == 4
    assert weight_grad_splits(32768, 4096, 4096, block=128, block_t=64) == 1  # 1024 tiles
    assert weight_grad_splits(128, 1024, 1024, block=128, block_t=64) == 2  # only 2 chunks
    # fp32 partials are capped at 256 MiB: 16 tiles of 1024 would want 16 splits of 64 MiB
    assert weight_grad_splits(1 << 20, 4096, 4096, block=1024, block_t=64) == 4


@pytest.mark.parametrize("implementation", ["xla", "interpret"])
def test_bf16_inputs_accumulate_in_fp32(implementation):
    t, k, n, block = 64, 256, 128, 32
    x, w, mask, dy = _inputs(t, k, n, block, 0.5, None, jnp.bfloat16, seed=7)
    layout = build_layout(mask)
    y, vjp = jax.vjp(lambda x, w: block_sparse_matmul(x, w, layout, block=block,
                                                      implementation=implementation,
                                                      block_t=32), x, w)
    dx, dw = vjp(dy)
    assert y.dtype == dx.dtype == dw.dtype == jnp.bfloat16
    y_ref, dx_ref, dw_ref = _reference_grads(x, w, mask, dy, block)
    for ours, ref in ((y, y_ref), (dx, dx_ref), (dw, dw_ref)):
        assert _relative_error(ours, ref) < 1e-2  # bf16 rounding of the output only


def test_leading_dimensions_are_flattened_and_restored():
    x = jax.random.normal(jax.random.key(0), (2, 3, 64))
    w = jax.random.normal(jax.random.key(1), (64, 64))
    mask = jnp.array([[True, False], [False, True]])
    y = block_sparse_matmul(x, w, build_layout(mask), block=32, implementation="interpret",
                            block_t=16)
    assert y.shape == (2, 3, 64)
    np.testing.assert_allclose(y.reshape(6, 64), reference.matmul(x.reshape(6, 64), w, mask, 32),
                               rtol=1e-5, atol=1e-5)


def test_layout_tables_list_the_kept_tiles_in_order():
    mask = jnp.array([[1, 0, 1], [0, 0, 0], [1, 1, 0], [0, 0, 1]], bool)
    layout = build_layout(mask)
    np.testing.assert_array_equal(layout.col_count, [2, 1, 2])
    np.testing.assert_array_equal(layout.col_table[0, :2], [0, 2])
    np.testing.assert_array_equal(layout.col_table[2, :2], [0, 3])
    np.testing.assert_array_equal(layout.row_count, [2, 0, 2, 1])
    np.testing.assert_array_equal(layout.row_table[2, :2], [0, 1])
    np.testing.assert_array_equal(layout.row_table[3, :1], [2])


@pytest.mark.parametrize("make, needle", [
    (lambda x, w, m: (x, w, build_layout(m[:1]), 32), "layout mask has shape"),
    (lambda x, w, m: (x, w, build_layout(m), 48), "does not divide"),
    (lambda x, w, m: (x.astype(jnp.int32), w, build_layout(m), 32), "dtype"),
    (lambda x, w, m: (x[:, :32], w, build_layout(m), 32), "do not multiply"),
])
def test_bad_input_is_a_clear_error(make, needle):
    x = jnp.ones((32, 64))
    w = jnp.ones((64, 64))
    mask = jnp.ones((2, 2), bool)
    x, w, layout, block = make(x, w, mask)
    with pytest.raises(BlockSparseError, match=needle):
        block_sparse_matmul(x, w, layout, block=block, implementation="interpret")


MOSAIC_CASES = [  # (T, K, N, block, density, special): bf16, blocks 64 and 128
    (128, 256, 384, 64, 0.5, "empty_rows_and_cols"),
    (200, 256, 256, 128, 0.5, None),  # T padded to the 128-row tile
    (128, 128, 256, 64, 1.0, None),  # fully dense mask
    (128, 256, 128, 64, 0.0, None),  # everything pruned
]


@pytest.mark.parametrize("case", MOSAIC_CASES,
                         ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}-b{c[3]}-d{c[4]}")
def test_mosaic_gpu_kernels_in_interpret_mode_match_the_reference(case):
    """The Mosaic GPU (TMA + wgmma) kernels, run by Mosaic GPU's interpreter on CPU."""
    t, k, n, block, density, special = case
    x, w, mask, dy = _inputs(t, k, n, block, density, special, jnp.bfloat16, seed=sum(case[:4]))
    _check_bf16_products(x, w, mask, dy, block, "mosaic_interpret")


def _check_bf16_products(x, w, mask, dy, block, implementation, mosaic=None):
    """Y, dX and dW of bf16 activations with fp32 master weights (as in training: dW comes
    back in fp32) against the reference; pruned tiles of dW exactly zero."""
    w = w.astype(jnp.float32)
    layout = build_layout(mask)
    y, vjp = jax.vjp(lambda x, w: block_sparse_matmul(x, w, layout, block=block, mosaic=mosaic,
                                                      implementation=implementation), x, w)
    dx, dw = vjp(dy)
    assert y.dtype == dx.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
    y_ref, dx_ref, dw_ref = _reference_grads(x, w.astype(jnp.bfloat16), mask, dy, block)
    for ours, ref in ((y, y_ref), (dx, dx_ref), (dw, dw_ref)):
        assert ours.shape == ref.shape
        assert not np.any(np.isnan(np.asarray(ours, np.float32)))
        if np.any(np.asarray(ref) != 0):
            # y and dx are rounded to bf16 once (relative 2^-9 per element); dw stays fp32
            assert _relative_error(ours, ref) < (1e-5 if ours is dw else 5e-3)
        else:
            np.testing.assert_array_equal(np.asarray(ours, np.float32), 0.0)
    pruned = ~np.asarray(reference.expand(mask, block, jnp.float32), bool)
    assert np.all(np.asarray(dw)[pruned] == 0.0)


# (T, K, N, block, density, special, SMs); T is padded to the 256-row tile
WS_CASES = [
    (256, 256, 384, 64, 0.5, "empty_rows_and_cols", 132),
    (300, 256, 256, 128, 0.5, None, 1),  # one program walks every tile; T padded to 512
    (256, 256, 128, 64, 0.0, None, 2),  # everything pruned: zero accumulators stored
    (256, 128, 384, 128, 0.0, None, 3),  # block 128 all pruned: no dW item writes anything
]


@pytest.mark.timeout(300)  # a ring whose stages are not all freed deadlocks: fail, not hang
@pytest.mark.parametrize("delay_release", [0, 1])
@pytest.mark.parametrize("variant", ["mosaic_ws", "mosaic_stream"])
@pytest.mark.parametrize("case", WS_CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}-b{c[3]}-d{c[4]}"
                                                         f"-sms{c[6]}")
def test_warp_specialized_mosaic_kernels_in_interpret_mode_match_the_reference(
        case, variant, delay_release, monkeypatch, capsys):
    """mosaic_ws / mosaic_stream: two compute warpgroups and a TMA warpgroup (forward and
    input grad; mosaic_stream's weight grad at block 128). With few SMs each program loops
    over many tiles, so the shared-memory ring and the epilogue buffer are reused across
    tiles of different step counts. The interpreter's race detector must find no unordered
    shared-memory access. delay_release=1 keeps one wgmma in flight and frees each stage a
    step late: every stage must still be freed exactly once per fill (else the ring
    deadlocks or a load overwrites a stage in use)."""
    t, k, n, block, density, special, sms = case
    monkeypatch.setattr(kernel_mgpu, "DEFAULT_SMS", sms)
    monkeypatch.setattr(kernel_mgpu, "INTERPRET_PARAMS",
                        kernel_mgpu.plgpu.InterpretGPUParams(detect_races=True))
    x, w, mask, dy = _inputs(t, k, n, block, density, special, jnp.bfloat16, seed=t + k + sms)
    # all three products (mosaic_stream's own dW at block 128, the plain Mosaic one else)
    # the tuned tiling walks 8 output columns at a time: more than these shapes have (2-6)
    tiling = dataclasses.replace(TUNED_WARP_SPECIALIZED, delay_release=delay_release)
    _check_bf16_products(x, w, mask, dy, block, f"{variant}_interpret", tiling)
    assert "RACE DETECTED" not in capsys.readouterr().out


@pytest.mark.parametrize("implementation", ["mosaic_interpret,interpret,xla",
                                            "xla,mosaic_interpret,interpret"])
def test_one_implementation_per_product_matches_the_reference(implementation):
    """Forward, input grad and weight grad each on its own kernel family; rows padded to the
    largest row tile among them (200 -> 256)."""
    t, k, n, block = 200, 256, 256, 64
    x, w, mask, dy = _inputs(t, k, n, block, 0.5, "empty_rows_and_cols", jnp.bfloat16, seed=7)
    layout = build_layout(mask)
    y, vjp = jax.vjp(lambda x, w: block_sparse_matmul(x, w, layout, block=block,
                                                      implementation=implementation), x, w)
    dx, dw = vjp(dy)
    for ours, ref in zip((y, dx, dw), _reference_grads(x, w, mask, dy, block)):
        assert ours.shape == ref.shape
        assert _relative_error(ours, ref) < 5e-3


@pytest.mark.parametrize("implementation", ["mosaic,pallas", "pallas,pallas,triton", "cuda"])
def test_a_bad_implementation_names_the_choices(implementation):
    x, w = jnp.ones((64, 64), jnp.bfloat16), jnp.ones((64, 64), jnp.bfloat16)
    with pytest.raises(BlockSparseError, match="forward,input_grad,weight_grad"):
        block_sparse_matmul(x, w, build_layout(jnp.ones((1, 1), bool)), block=64,
                            implementation=implementation)


def test_mosaic_rejects_what_wgmma_cannot_take():
    x, w = jnp.ones((128, 128), jnp.float32), jnp.ones((128, 128), jnp.float32)
    layout = build_layout(jnp.ones((4, 4), bool))
    with pytest.raises(BlockSparseError, match="bfloat16 or float16"):
        block_sparse_matmul(x, w, layout, block=32, implementation="mosaic_interpret")
    with pytest.raises(BlockSparseError, match="blocks 64 and 128"):
        block_sparse_matmul(x.astype(jnp.bfloat16), w, layout, block=32,
                            implementation="mosaic_interpret")


GPU_IMPLEMENTATIONS = ["pallas", "mosaic", "mosaic,pallas,pallas", "mosaic_ws,mosaic_ws,pallas",
                       "mosaic_stream,mosaic_stream,pallas", "mosaic_stream"]
WARP_SPECIALIZED = ("mosaic_ws", "mosaic_stream")  # the kernels delay_release applies to


@pytest.mark.gpu
@pytest.mark.parametrize("implementation, delay_release", [
    (implementation, delay) for implementation in GPU_IMPLEMENTATIONS for delay in (0, 1)
    if delay == 0 or implementation.startswith(WARP_SPECIALIZED)])
@pytest.mark.parametrize("block", [64, 128])
@pytest.mark.parametrize("density", [0.1, 0.25, 0.5, 1.0])
def test_gpu_kernels_match_the_reference(implementation, block, density, delay_release):
    t, k, n = 1024, 1024, 2048
    x, w, mask, dy = _inputs(t, k, n, block, density, None, jnp.bfloat16, seed=block)
    layout = build_layout(mask)
    tiling = dataclasses.replace(TUNED_WARP_SPECIALIZED, delay_release=delay_release)
    y, vjp = jax.vjp(lambda x, w: block_sparse_matmul(x, w, layout, block=block, mosaic=tiling,
                                                      implementation=implementation), x, w)
    dx, dw = vjp(dy)
    y_ref, dx_ref, dw_ref = _reference_grads(x, w, mask, dy, block)
    for ours, ref in ((y, y_ref), (dx, dx_ref), (dw, dw_ref)):
        assert not np.any(np.isnan(np.asarray(ours, np.float32)))
        assert _relative_error(ours, ref) < 1e-2


def test_the_benchmarks_forward_and_backward_keeps_the_forward():
    """A linear layer's backward reads only X and W: unless Y is returned too, XLA drops the
    forward and 'forward + backward' times the backward alone. Three dots must survive."""
    from pallas_kernels.block_sparse.bench import forward_and_backward

    x, w, dy = jnp.ones((32, 16)), jnp.ones((16, 8)), jnp.ones((32, 8))
    def dots(fn):
        return jax.jit(lambda x, w, dy: fn(jnp.dot, x, w, dy)).lower(
            x, w, dy).compile().as_text().count(" dot(")

    assert dots(forward_and_backward) == 3
    assert dots(bench.input_grad_only) == dots(bench.weight_grad_only) == 1  # one product each


def test_the_benchmark_runs_on_cpu_in_interpret_mode(capsys):
    rows = bench.bench_shape(128, 64, 64, [32], [0.5], reps=1, implementations=["pallas"])
    assert len(rows) == 1 and rows[0]["sparsity"] == pytest.approx(0.5)
    for key in ("sparse_fwd_ms", "sparse_fb_ms", "sparse_dx_ms", "sparse_dw_ms", "xla_dx_ms",
                "xla_dw_ms"):
        assert rows[0][key] > 0, key


def test_the_benchmarks_d1_names_run_the_same_kernels_with_one_wgmma_in_flight():
    base = kernel_mgpu.MosaicTiling(block_m=64)
    for name in bench.DELAYED:
        assert bench.RUNS_AS[f"{name}_d1"] == bench.RUNS_AS[name]
        assert bench.mosaic_tiling(f"{name}_d1", base) == kernel_mgpu.MosaicTiling(
            block_m=64, delay_release=1)
        assert bench.mosaic_tiling(name, base) is base
        # no tiling given: the API's tuned one for these kernels, or none (the API chooses)
        assert bench.mosaic_tiling(f"{name}_d1") == dataclasses.replace(
            TUNED_WARP_SPECIALIZED, delay_release=1)
        assert bench.mosaic_tiling(name) is None
    # --sweep's warp-specialized candidates: distinct, both release delays, every tile order
    candidates = bench.mosaic_candidates("mosaic_ws")
    assert len(set(candidates)) == len(candidates) == 16
    assert {c.delay_release for c in candidates} == {0, 1}
    assert {c.grid_block_n for c in candidates} == {1, 2, 4, 8}
    assert all(c.max_concurrent_steps <= 3 for c in candidates)  # shared memory: 3 stages


# (Triton's lowering needs a GPU: mosaic_ws's weight grad is the reference here)
@pytest.mark.parametrize("implementation", ["mosaic_ws,mosaic_ws,xla", "mosaic_stream"])
@pytest.mark.parametrize("delay_release", [0, 1])
def test_warp_specialized_kernels_lower_for_cuda_on_this_cpu(implementation, delay_release):
    """The Pallas -> Mosaic GPU lowering of the warp-specialized products for the CUDA
    platform, without a GPU: catches what the lowering rejects before GPU time is spent."""
    t, k, n, block = 1024, 512, 1024, 128
    x = jax.ShapeDtypeStruct((t, k), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((k, n), jnp.float32)
    dy = jax.ShapeDtypeStruct((t, n), jnp.bfloat16)
    layout = build_layout(np.asarray(jax.random.uniform(jax.random.key(1), (k // block,
                                                                            n // block)) < 0.5))
    tiling = kernel_mgpu.MosaicTiling(delay_release=delay_release)

    def fb(x, w, dy):
        y, vjp = jax.vjp(lambda x, w: block_sparse_matmul(
            x, w.astype(jnp.bfloat16), layout, block=block, mosaic=tiling,
            implementation=implementation), x, w)
        return (y, *vjp(dy))

    text = jax.jit(fb).trace(x, w, dy).lower(lowering_platforms=("cuda",)).as_text()
    mosaic_kernels = 3 if implementation == "mosaic_stream" else 2
    assert text.count("mosaic_gpu") >= mosaic_kernels


def test_streamed_weight_grad_splits_tokens_only_where_tiles_are_few():
    from pallas_kernels.block_sparse import kernel_mgpu_ws as ws

    assert ws.token_splits(512, 64, 1024 * 1024) == 16  # 1024x1024 weight at block 128
    assert ws.token_splits(8, 4, 256 * 256) == 8  # capped by the chunks there are
    assert ws.token_splits(12, 4, 256 * 256) == 4  # a power of two dividing them
    assert ws.token_splits(256, 4096, 4096 * 16384) == 1  # many tiles: no split
    # the fp32 partials stay under the cap: 8 x 4096 x 4096 x 4 bytes = 512 MiB > 256 MiB
    assert ws.token_splits(512, 16, 4096 * 4096) == 4
