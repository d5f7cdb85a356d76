"""Mixture of experts: routing, losses, dropless and capacity dispatch against a per-token
dense reference, expert/tensor/data/FSDP parallel equal to single device, checkpoints moving
between meshes, bad input."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import TrainHarness
from spjax import parallel
from spjax.checkpoint import Checkpointer
from spjax.config import load_config
from spjax.errors import ConfigError
from spjax.model import moe as moe_lib
from spjax.model.structures import LinearFactory, dense_everywhere
from spjax.model.transformer import closed_form_param_count
from spjax.train.state import Program

MODEL = ["model=tiny", "model.d_model=32", "model.d_ff=64", "model.n_heads=2",
         "model.n_layers=2", "model.vocab_size=64", "model.compute_dtype=float32",
         "model.moe.num_experts=8", "model.moe.top_k=2", "data.seq_len=16",
         "data.batch_size=8", "optimizer.warmup_steps=1", "optimizer.lr=1e-2"]


def _layer(*extra: str) -> moe_lib.MoE:
    config = load_config(None, [*MODEL, *extra]).model
    linear = LinearFactory(dense_everywhere, config.init_std, jnp.float32, jnp.float32)
    return moe_lib.MoE("layers/0/moe", config, linear, nnx.Rngs(0))


def _reference(layer: moe_lib.MoE, x_NxD: np.ndarray) -> np.ndarray:
    """Per token: softmax router, top-k, renormalized gates, each chosen expert's SwiGLU run
    densely in float64, summed."""
    router = np.asarray(layer.router[...], np.float64)
    wg, wu, wd = (np.asarray(w.kernel[...], np.float64)
                  for w in (layer.gate, layer.up, layer.down))
    x = np.asarray(x_NxD, np.float64)
    out = np.zeros_like(x)
    for n in range(x.shape[0]):
        logits = x[n] @ router
        p = np.exp(logits - logits.max())
        p /= p.sum()
        top = np.argsort(-p, kind="stable")[: layer.moe.top_k]
        gates = p[top] / p[top].sum()
        for g, e in zip(gates, top):
            gate = x[n] @ wg[e]
            out[n] += g * (((gate / (1 + np.exp(-gate))) * (x[n] @ wu[e])) @ wd[e])
    return out


def test_dropless_moe_equals_the_per_token_dense_reference():
    layer = _layer()
    x = jax.random.normal(jax.random.key(1), (2, 16, 32))
    y, aux = layer(x)
    ref = _reference(layer, np.asarray(x).reshape(-1, 32))
    np.testing.assert_allclose(np.asarray(y).reshape(-1, 32), ref, rtol=1e-4, atol=1e-5)
    assert set(aux) == {"load_balance", "z_loss"}


def test_router_losses_equal_their_formulas():
    layer = _layer()
    x = jax.random.normal(jax.random.key(2), (64, 32))
    _, experts, stats = moe_lib.route(x, layer.router[...], 2)
    losses = moe_lib.losses_from(stats, 2)
    logits = np.asarray(x, np.float64) @ np.asarray(layer.router[...], np.float64)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    f = np.bincount(np.asarray(experts).ravel(), minlength=8) / (64 * 2)
    assert float(losses["load_balance"]) == pytest.approx(8 * np.sum(f * p.mean(0)), rel=1e-5)
    lse = np.log(np.exp(logits).sum(1))
    assert float(losses["z_loss"]) == pytest.approx(np.mean(lse ** 2), rel=1e-5)


def test_gradients_match_the_reference_gradients():
    layer = _layer()
    x = jax.random.normal(jax.random.key(3), (1, 12, 32))
    graphdef, params = nnx.split(layer, nnx.Param)

    def ours(p):
        return jnp.sum(jnp.sin(nnx.merge(graphdef, p)(x)[0]))

    def reference(p):  # same routing decisions, dense per-expert compute through autodiff
        m = nnx.merge(graphdef, p)
        xs = x.reshape(-1, 32)
        gates, experts, _ = moe_lib.route(xs, m.router[...], 2)
        out = jnp.zeros_like(xs)
        for k in range(2):
            e = experts[:, k]
            gate = jnp.einsum("nd,ndf->nf", xs, m.gate.kernel[...][e])
            h = jax.nn.silu(gate) * jnp.einsum("nd,ndf->nf", xs, m.up.kernel[...][e])
            out = out + gates[:, k:k + 1] * jnp.einsum("nf,nfd->nd", h, m.down.kernel[...][e])
        return jnp.sum(jnp.sin(out))

    # jitted: the same gradients as op by op, one compile each instead of many small ones
    g1, g2 = jax.jit(jax.grad(ours))(params), jax.jit(jax.grad(reference))(params)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_capacity_drops_overflow_in_priority_order_and_large_capacity_is_dropless():
    layer = _layer("model.moe.capacity_factor=100.0")
    x = jax.random.normal(jax.random.key(4), (1, 32, 32))
    np.testing.assert_allclose(layer(x)[0], _layer()(x)[0], rtol=1e-5, atol=1e-6)

    tight = _layer("model.moe.capacity_factor=0.5")
    xs = x.reshape(-1, 32)
    gates, experts, _ = moe_lib.route(xs, tight.router[...], 2)
    capacity = moe_lib.capacity_for(32, 2, 8, 0.5)
    taken = np.zeros(8, int)
    keep = np.zeros((32, 2), bool)
    for k in range(2):  # all top-1 choices first, then top-2
        for n in range(32):
            e = int(experts[n, k])
            keep[n, k] = taken[e] < capacity
            taken[e] += 1
    assert not keep.all()  # the test really drops something
    expected = _reference_with_keep(tight, np.asarray(xs), np.asarray(gates),
                                    np.asarray(experts), keep)
    np.testing.assert_allclose(np.asarray(tight(x)[0]).reshape(-1, 32), expected, rtol=1e-4,
                               atol=1e-5)


def _reference_with_keep(layer, x, gates, experts, keep):
    wg, wu, wd = (np.asarray(w.kernel[...], np.float64)
                  for w in (layer.gate, layer.up, layer.down))
    out = np.zeros_like(x, dtype=np.float64)
    for n in range(x.shape[0]):
        for k in range(experts.shape[1]):
            if keep[n, k]:
                e = experts[n, k]
                gate = x[n] @ wg[e]
                out[n] += gates[n, k] * (((gate / (1 + np.exp(-gate))) * (x[n] @ wu[e])) @ wd[e])
    return out


def Run(*overrides: str, n_devices: int = 1) -> TrainHarness:
    return TrainHarness(load_config(None, [*MODEL, "train.steps=20", *overrides]), n_devices)


def _batches(n):
    rng = np.random.default_rng(0)
    return [rng.integers(0, 64, size=(8, 17), dtype=np.int32) for _ in range(n)]


@pytest.fixture(scope="module")
def single_device_moe():
    """The reference of the mesh comparisons below, trained once: each step's metrics on
    _batches(4) and the final parameters on one device."""
    single = Run("parallel.data=1")
    return [single.step(tokens) for tokens in _batches(4)], single.state.params


@pytest.mark.parametrize("mesh", [
    # the default suite keeps one mesh per axis kind; the pure ones are slow (~30 s each)
    pytest.param(["parallel.expert=8", "parallel.data=1"], marks=pytest.mark.slow),
    ["parallel.expert=4", "parallel.data=2"],
    ["parallel.expert=2", "parallel.tensor=2", "parallel.fsdp=2"],
    # tensor parallelism stays in the default suite through ep2-tp2-fsdp2
    pytest.param(["parallel.tensor=2", "parallel.data=4"], marks=pytest.mark.slow),
    pytest.param(["parallel.fsdp=8"], marks=pytest.mark.slow),
], ids=["ep8", "ep4-dp2", "ep2-tp2-fsdp2", "tp2-dp4", "fsdp8"])
def test_parallel_moe_training_equals_single_device(mesh, single_device_moe):
    single_metrics, single_params = single_device_moe
    sharded = Run(*mesh, n_devices=8)
    w = sharded.state.params["layers"][0]["moe"]["gate"]["kernel"]
    if "parallel.expert=8" in mesh:
        assert w.sharding.spec[0] == "expert"  # experts really are split over devices
    for tokens, a in zip(_batches(4), single_metrics, strict=True):
        b = sharded.step(tokens)
        for key in ("loss", "moe_load_balance", "moe_z_loss", "grad_norm"):
            assert float(b[key]) == pytest.approx(float(a[key]), rel=2e-5), key
    for x, y in zip(jax.tree.leaves(single_params), jax.tree.leaves(sharded.state.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mesh", [
    ["parallel.expert=4", "parallel.data=2"],
    pytest.param(["parallel.expert=2", "parallel.tensor=2", "parallel.fsdp=2"],
                 marks=pytest.mark.slow),
], ids=["ep4-dp2", "ep2-tp2-fsdp2"])
def test_ragged_dispatch_trains_exactly_like_the_padded_one(mesh, monkeypatch):
    """The ragged exchange's offsets and counts, with ragged_all_to_all emulated from its
    documented semantics (XLA:CPU lacks it); the real collective runs in the GPU test."""
    from spjax.model import moe_ragged

    monkeypatch.setattr(moe_ragged, "COLLECTIVE", moe_ragged.emulated_ragged_all_to_all)
    padded = Run(*mesh, "model.moe.dispatch=padded", n_devices=8)
    ragged = Run(*mesh, "model.moe.dispatch=ragged", n_devices=8)
    for tokens in _batches(3):
        a, b = padded.step(tokens), ragged.step(tokens)
        for key in ("loss", "moe_load_balance", "grad_norm"):
            assert float(b[key]) == pytest.approx(float(a[key]), rel=1e-6), key
    for x, y in zip(jax.tree.leaves(padded.state.params), jax.tree.leaves(ragged.state.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-7)


def test_emulated_ragged_all_to_all_follows_the_documented_example():
    """Device s sends rows [s*10 + i] to each device r in turn: 1 row to r = 0, 2 to r = 1,
    ...; receiver r stores sender s's rows after those of senders < s."""
    from jax.sharding import Mesh, PartitionSpec as P
    from spjax.model.moe_ragged import emulated_ragged_all_to_all

    shards = 4
    mesh = Mesh(np.array(jax.devices()[:shards]), ("x",))
    sizes = jnp.tile(jnp.arange(1, shards + 1, dtype=jnp.int32), (shards, 1))  # [s, r] = r + 1

    def body(sizes_row):
        s = jax.lax.axis_index("x")
        send = sizes_row[0]
        operand = (s * 10 + jnp.arange(16)).astype(jnp.float32)
        lands = s * send  # every sender sends r + 1 rows to r: sender s lands at s * (r + 1)
        out = emulated_ragged_all_to_all(
            operand, jnp.full((16,), -1.0), jnp.cumsum(send) - send, send, lands,
            jnp.zeros_like(send), axis_name="x")
        return out[None]

    out = np.asarray(jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("x"),
                                           out_specs=P("x")))(sizes))  # one compile, not ~190
    for r in range(shards):
        expected = np.full(16, -1.0)
        for s in range(shards):
            start = sum(range(1, r + 1))  # sender s's first row for r: after rows for 0..r-1
            expected[s * (r + 1):(s + 1) * (r + 1)] = s * 10 + start + np.arange(r + 1)
        np.testing.assert_array_equal(out[r], expected)


def test_pallas_grouped_gemm_where_it_cannot_run_is_a_clear_error():
    run = Run("model.moe.grouped_gemm=pallas", n_devices=1)
    with pytest.raises(ConfigError, match="grouped_gemm=pallas needs a Hopper GPU.*backend cpu"):
        run.step(_batches(1)[0])


def test_ragged_dispatch_on_cpu_without_the_collective_is_a_clear_error():
    run = Run("parallel.expert=4", "parallel.data=2", "model.moe.dispatch=ragged", n_devices=8)
    with pytest.raises(ConfigError, match="needs a GPU.*dispatch=padded"):
        run.step(_batches(1)[0])


@pytest.mark.gpu
def test_gpu_ragged_dispatch_trains_exactly_like_the_padded_one():
    """Two GPUs or more: the real ragged_all_to_all against the padded exchange."""
    if len(jax.devices()) < 2:
        pytest.skip("needs 2 GPUs (nvidia-h200-x2)")
    n = len(jax.devices())
    padded = Run(f"parallel.expert={n}", "model.moe.dispatch=padded", n_devices=n)
    ragged = Run(f"parallel.expert={n}", "model.moe.dispatch=ragged", n_devices=n)
    for tokens in _batches(3):
        a, b = padded.step(tokens), ragged.step(tokens)
        assert float(b["loss"]) == pytest.approx(float(a["loss"]), rel=1e-5)


def test_checkpoint_saved_on_one_mesh_restores_onto_another(tmp_path):
    from spjax.data import train_iterator
    from spjax.data import prepare_dataset
    import sysconfig
    from pathlib import Path

    data = tmp_path / "data"
    prepare_dataset([str(Path(sysconfig.get_paths()["stdlib"]) / "json")], data,
                    progress=False)
    iterator = train_iterator(data, 16, 8, seed=0, process_index=0, process_count=1)
    a = Run("parallel.expert=4", "parallel.data=2", n_devices=8)
    batches = _batches(4)
    for tokens in batches[:2]:
        a.step(tokens)
    ckpt = Checkpointer(tmp_path / "ckpt", keep=1)
    ckpt.save(2, a.state, iterator, {})
    ckpt.wait()
    b = Run("parallel.expert=2", "parallel.fsdp=2", "parallel.tensor=2", n_devices=8)
    b.state = ckpt.restore(2, b.layout.abstract, iterator, {})
    ckpt.close()
    restored = b.state.params["layers"][1]["moe"]["up"]["kernel"]
    assert restored.sharding.spec == b.layout.state.params["layers"][1]["moe"]["up"]["kernel"].spec
    for x, y in zip(jax.tree.leaves(a.state), jax.tree.leaves(b.state)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    for tokens in batches[2:]:  # and both continue identically
        m1, m2 = a.step(tokens), b.step(tokens)
        assert float(m1["loss"]) == pytest.approx(float(m2["loss"]), rel=2e-5)


def test_param_count_and_active_flops():
    config = load_config(None, [*MODEL, "model.moe.shared_expert=true", "model.moe.every=2"])
    program = Program.build(config)
    assert program.model_def.param_count() == closed_form_param_count(config.model)
    from spjax.train import accounting as flops

    d, f, e = 32, 64, 8
    dense_layer, moe_layer = 4 * d * d + 3 * d * f, 4 * d * d + d * e + 2 * 3 * d * f + 3 * d * f
    assert flops.matmul_params(config.model) == dense_layer + moe_layer + d * 64


@pytest.mark.parametrize("overrides, needle", [
    (["model.moe.top_k=9"], "top_k"),
    (["parallel.expert=3"], "divisible by parallel.expert"),
    (["model.moe.num_experts=0", "parallel.expert=2"], "needs a mixture-of-experts"),
    (["model.moe.capacity_factor=1.0", "parallel.expert=2"], "dropless"),
])
def test_bad_moe_settings_are_clear_errors(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(None, [*MODEL, *overrides])


def test_mesh_larger_than_devices_names_the_sizes():
    config = load_config(None, [*MODEL, "parallel.expert=8", "parallel.data=2"])
    with pytest.raises(ConfigError, match="must use all 8 devices"):
        parallel.make_mesh(config.parallel)
