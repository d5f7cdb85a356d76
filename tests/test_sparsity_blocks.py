"""Block-sparse layers (sparsity.pattern=block) in the real train step: the kernel path equals
the dense-masked one, the kernels under a mesh equal one device, `sparsity.kernel` names map to
one implementation per product (`auto` by device, block and dtype), and the Mosaic limits are
start-up errors. The harness (MODEL, Run) is test_sparsity.py's.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import TrainHarness
from spjax import parallel
from spjax.config import load_config
from spjax.errors import ConfigError
from spjax.tree import get_path
from spjax.train.state import Program
from test_sparsity import MODEL, Run


@pytest.mark.parametrize("method", ["static",  # gmp and rigl: ~35-45 s each
                                    pytest.param("gmp", marks=pytest.mark.slow),
                                    pytest.param("rigl", marks=pytest.mark.slow)])
def test_block_kernel_layers_train_exactly_like_masked_dense_ones(method):
    """The Pallas block-sparse path (interpreted here) and the dense-masked path give the same
    losses, masks and weights, across mask updates; tables always match the mask; RigL's
    regrowth steps take the dense path (flag set) so both regrow from dense gradients."""
    common = [f"sparsity.method={method}", "sparsity.pattern=block", "sparsity.block=32",
              "sparsity.sparsity=0.5", f"sparsity.{'rigl' if method == 'rigl' else 'gmp'}"
              ".update_every=2", "model.d_ff=128", "model.n_layers=1"]  # 7 layers of 3 shapes
    kernel = Run(*common, "sparsity.kernel=interpret", steps=8)
    masked = Run(*common, "sparsity.kernel=none", steps=8)
    from pallas_kernels.block_sparse.layout import build_layout

    for _ in range(6):
        before, a = kernel.step()
        _, b = masked.step()
        assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=1e-5)
        for layer in kernel.layers:
            mask = kernel.mask(layer)
            np.testing.assert_array_equal(mask, masked.mask(layer))
            np.testing.assert_allclose(kernel.kernel(layer), masked.kernel(layer), rtol=1e-4,
                                       atol=1e-6)
            tables = get_path(kernel.state.structure, layer.path)["tables"]
            expected = build_layout(jnp.asarray(mask[::32, ::32]))
            for name, value in vars(expected).items():
                np.testing.assert_array_equal(tables[name], value)
    if method == "rigl":
        structure = kernel.program.sparsity.prepare(jnp.int32(1), kernel.state.structure)
        flag = get_path(structure, kernel.layers[0].path)["dense_grad"]
        assert bool(flag)  # the step completing t = 2 regrows: dense path


@pytest.mark.parametrize("mesh, w_spec", [
    ((2, 2, 2), ("fsdp", "tensor")), ((1, 8, 1), ("fsdp", None)), ((8, 1, 1), (None, None))],
    ids=["2-2-2", "1-8-1", "8-1-1"])
def test_block_sparse_matmul_in_shard_map_has_one_device_gradients(mesh, w_spec):
    """The layer's shard_map (batch rows split, weight gathered whole) gives one device's Y, dX
    and dW: dW summed over the batch shards exactly once, not also over `tensor` (Adam would
    hide a scaled gradient in a training comparison, so the gradients are compared here)."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from pallas_kernels.block_sparse import block_sparse_matmul
    from pallas_kernels.block_sparse.layout import build_layout
    from spjax.model.blocksparse import _over_batch_shards

    data, fsdp, tensor = mesh
    config = load_config(None, [*MODEL, f"parallel.data={data}", f"parallel.fsdp={fsdp}",
                                f"parallel.tensor={tensor}"])
    mesh = parallel.make_mesh(config.parallel, jax.devices()[:8])
    rules = parallel.sharding_rules(config.parallel)
    keys = jax.random.split(jax.random.key(3), 4)
    x = jax.random.normal(keys[0], (8, 16, 64))
    w = jax.random.normal(keys[1], (64, 128))
    g = jax.random.normal(keys[2], (8, 16, 128))
    layout = build_layout(jax.random.uniform(keys[3], (2, 4)) < 0.5)
    call = functools.partial(block_sparse_matmul, block=32, implementation="interpret")

    def loss(x, w, sharded):
        y = _over_batch_shards(call, (mesh, rules), x, w, layout) if sharded else call(
            x, w, layout)
        return jnp.sum(y * g)

    single = jax.jit(jax.value_and_grad(lambda x, w: loss(x, w, False), argnums=(0, 1)))(x, w)
    x_s = jax.device_put(x, parallel.batch_sharding(mesh, rules, ndim=3))
    w_s = jax.device_put(w, NamedSharding(mesh, P(*w_spec)))
    sharded = jax.jit(jax.value_and_grad(lambda x, w: loss(x, w, True), argnums=(0, 1)))(x_s, w_s)
    np.testing.assert_allclose(sharded[0], single[0], rtol=1e-5)
    for a, b in zip(sharded[1], single[1]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mesh", [["parallel.data=2", "parallel.fsdp=2", "parallel.tensor=2"],
                                  pytest.param(["parallel.data=1", "parallel.fsdp=8"],
                                               marks=pytest.mark.slow)], ids=["2-2-2", "1-8-1"])
def test_block_kernels_under_a_mesh_train_like_one_device(mesh):
    """Under a mesh the block-sparse kernels (interpreted here) run in shard_map over the batch
    axes, the weight gathered whole, inside the real train step: losses and weights equal one
    device's."""
    common = ["sparsity.method=static", "sparsity.pattern=block", "sparsity.block=32",
              "sparsity.sparsity=0.5", "model.d_ff=128", "sparsity.kernel=interpret",
              "model.n_layers=1"]  # 7 block-sparse layers of 3 shapes, each interpreted
    sharded = Run(*common, *mesh, n_devices=8, steps=4)
    single = Run(*common, steps=4)
    for _ in range(3):
        _, a = sharded.step()
        _, b = single.step()
        for key in ("loss", "grad_norm"):  # grad_norm: Adam would hide a scaled gradient
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-5), key
    for layer in single.layers:
        np.testing.assert_allclose(sharded.kernel(layer), single.kernel(layer), rtol=1e-4,
                                   atol=1e-6)


@pytest.mark.parametrize("platform, capability, block, dtype, expected", [
    ("cpu", "", 128, "bfloat16", "xla"),
    ("gpu", "9.0", 128, "bfloat16", "mosaic_stream,mosaic_stream,pallas"),  # Hopper: Mosaic
    ("gpu", "9.0", 64, "bfloat16", "pallas"),  # block 64 on Mosaic not measured end to end
    ("gpu", "9.0", 128, "float32", "pallas"),  # wgmma takes 16-bit operands
    ("gpu", "8.0", 128, "bfloat16", "pallas"),  # no wgmma/TMA before Hopper
])
def test_auto_block_kernel_picks_by_device_block_and_dtype(monkeypatch, platform, capability,
                                                           block, dtype, expected):
    from types import SimpleNamespace

    from spjax.sparsity import engine

    device = SimpleNamespace(platform=platform, compute_capability=capability)
    monkeypatch.setattr(engine.jax, "devices", lambda *a: [device])
    config = load_config(None, [*MODEL, "sparsity.method=static", "sparsity.pattern=block",
                                f"sparsity.block={block}"])
    spec = engine.layer_assignment(config.sparsity, dtype)("layers/0/mlp/up")
    assert (spec.structure, spec.kernel) == ("blocksparse", expected)


@pytest.mark.parametrize("name, products", [
    ("mosaic_fwd", "mosaic,pallas,pallas"), ("mosaic_ws", "mosaic_ws,mosaic_ws,pallas"),
    ("mosaic_stream", "mosaic_stream,mosaic_stream,pallas")])
def test_kernel_names_map_to_one_implementation_per_product(name, products):
    from spjax.sparsity import engine

    overrides = [*MODEL, "model.compute_dtype=bfloat16", "sparsity.method=static",
                 "sparsity.pattern=block", "sparsity.block=64", f"sparsity.kernel={name}"]
    config = load_config(None, overrides)
    spec = engine.layer_assignment(config.sparsity)("layers/0/mlp/up")
    assert (spec.structure, spec.kernel) == ("blocksparse", products)
    program = Program.build(config)  # builds on CPU too (--dry-run on a login node) ...
    run = Run(*overrides[len(MODEL):], steps=2)
    with pytest.raises(ConfigError, match=r"sparsity.kernel runs GPU kernels.*backend is cpu"):
        run.step()  # ... but the step is a one-line error here
    assert program.sparsity is not None


@pytest.mark.parametrize("overrides, needle", [
    (["sparsity.block=32", "model.compute_dtype=bfloat16"], "blocks of 64 or 128.*block=32"),
    (["sparsity.block=64"], "bfloat16, got model.compute_dtype=float32"),
])
def test_mosaic_kernels_limits_are_start_up_errors(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(None, [*MODEL, "sparsity.method=static", "sparsity.pattern=block",
                           "sparsity.kernel=mosaic_ws", *overrides])


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["static", "rigl"])
def test_gpu_block_sparse_training_with_auto_kernels_matches_the_reference(method):
    """sparsity.kernel=auto on the GPU (Hopper, block 128, bf16: the warp-specialized Mosaic
    streamed kernels) trains like the plain-jnp reference: same losses step by step within bf16
    tolerance, same masks (RigL regrows from the same dense gradients)."""
    from spjax.sparsity import engine

    dims = ["model.d_model=256", "model.d_ff=512", "model.n_heads=2", "model.vocab_size=64",
            "model.compute_dtype=bfloat16", "sparsity.pattern=block", "sparsity.block=128",
            f"sparsity.method={method}", "sparsity.sparsity=0.5", "sparsity.rigl.update_every=2"]
    batch = np.random.default_rng(0).integers(0, 64, size=(8, 33), dtype=np.int32)
    tokens = [batch] * 6  # one batch again and again: the loss must fall
    runs = {}
    for kernel in ("auto", "xla"):
        config = load_config(None, [*MODEL, "train.steps=6", "parallel.data=1", *dims,
                                    f"sparsity.kernel={kernel}"])
        harness = TrainHarness(config, 1)
        if kernel == "auto":
            assert engine.auto_block_kernel(128, "bfloat16") == "mosaic_stream"
        runs[kernel] = [float(harness.step(batch)["loss"]) for batch in tokens]
    np.testing.assert_allclose(runs["auto"], runs["xla"], rtol=2e-2)
    assert runs["auto"][-1] < runs["auto"][0]  # it trains
