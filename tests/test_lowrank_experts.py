"""Low-rank MoE experts (model/experts_lowrank.py): each stack equals its formula per expert,
the MoE layer with low-rank experts equals the per-token dense reference with the effective
stacks and its factor gradients follow the chain rule, ReLoRA merges and refactorization keep
every expert's weight, expert parallelism trains like one device, the memory report counts
the factors, and what has no expert form is a start-up error."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from spjax import parallel
from spjax.config import load_config
from spjax.errors import ConfigError
from spjax.model import moe as moe_lib
from spjax.model.linear import LinearSpec
from spjax.model.structures import LinearFactory
from spjax.train.memory import memory_report
from spjax.train.state import Program, state_layout

from tests.test_moe import MODEL, Run, _batches, _reference

E, D, F, R, ALPHA = 8, 32, 64, 8, 2.0  # tiny MoE of tests/test_moe.py; the tiny preset's r
EXPERT_RULES = 'lowrank.rules=[[".*/moe/.*", lowrank], [".*", dense]]'


def _factory(structure: str, density: float = 0.1) -> LinearFactory:
    spec = LinearSpec(structure, rank=R, alpha=ALPHA, density=density)
    return LinearFactory(lambda name: spec, 0.02, jnp.float32, jnp.float32)


def _randomize(module: nnx.Module, seed: int) -> None:
    """Fresh random factors and values (B starts at zero for sltrain and relora), at a scale
    that keeps the layer's outputs of order one."""
    key = jax.random.key(seed)
    for i, (_, var) in enumerate(nnx.iter_graph(module)):
        if isinstance(var, nnx.Param):
            var[...] = 0.3 * jax.random.normal(jax.random.fold_in(key, i), var[...].shape)


def _formula(module: nnx.Module, structure: str) -> np.ndarray:
    a, b = np.asarray(module.a[...], np.float64), np.asarray(module.b[...], np.float64)
    w = np.einsum("eir,ero->eio", a, b) * ALPHA / R
    if structure == "sltrain":
        for e in range(w.shape[0]):
            flat = w[e].reshape(-1)
            flat[np.asarray(module.index[...][e])] += np.asarray(module.values[...][e])
    if structure == "relora":
        w += np.asarray(module.w0[...], np.float64)
    return w


@pytest.mark.parametrize("structure", ["lowrank", "sltrain", "relora"])
def test_expert_stacks_equal_their_formulas(structure):
    stack = _factory(structure).experts("layers/0/moe/up", E, D, F,
                                        ("experts", "embed", "mlp"), nnx.Rngs(3))
    _randomize(stack, seed=11)
    assert stack.a.shape == (E, D, R) and stack.b.shape == (E, R, F)
    np.testing.assert_allclose(stack.effective(), _formula(stack, structure), rtol=1e-5,
                               atol=1e-5)
    if structure == "sltrain":
        index = np.asarray(stack.index[...])
        nnz = int(0.1 * D * F)
        assert index.shape == (E, nnz) and index.dtype == np.int32
        assert all(len(np.unique(row)) == nnz for row in index)  # no repeated position
        assert len({tuple(row) for row in index}) == E  # each expert its own support
        dense = [v for _, v in nnx.iter_graph(stack)
                 if isinstance(v, nnx.Variable) and v[...].size >= E * D * F]
        assert not dense  # only factors, values and indices: never a dense S


def test_moe_with_low_rank_experts_equals_the_reference_and_its_factor_gradients():
    config = load_config(None, MODEL).model
    layer = moe_lib.MoE("layers/0/moe", config, _factory("sltrain"), nnx.Rngs(0))
    for stack in (layer.gate, layer.up, layer.down):
        _randomize(stack, seed=5)
    x = jax.random.normal(jax.random.key(1), (2, 16, D))
    y, _ = layer(x)
    effective = {k: types.SimpleNamespace(kernel=getattr(layer, k).effective())
                 for k in ("gate", "up", "down")}
    dense = types.SimpleNamespace(router=layer.router, moe=layer.moe, **effective)
    ref = _reference(dense, np.asarray(x).reshape(-1, D))
    np.testing.assert_allclose(np.asarray(y).reshape(-1, D), ref, rtol=1e-4, atol=1e-5)

    # dL/dA_e = (alpha/r) dL/dW_e B_e^T and dL/dvalues = dL/dW at the support
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

    def loss(params):
        return jnp.sum(nnx.merge(graphdef, params, rest)(x)[0] ** 2)

    def loss_dense(w_up):
        model = nnx.merge(graphdef, params, rest)
        model.up = types.SimpleNamespace(effective=lambda: w_up)
        return jnp.sum(model(x)[0] ** 2)

    grads = jax.grad(loss)(params)
    g_a, g_v = grads["up"]["a"][...], grads["up"]["values"][...]
    g_w = jax.grad(loss_dense)(layer.up.effective())
    np.testing.assert_allclose(g_a, ALPHA / R * jnp.einsum("eio,ero->eir", g_w, layer.up.b[...]),
                               rtol=1e-4, atol=1e-6)
    picked = jax.vmap(lambda g, i: g.reshape(-1)[i])(g_w, layer.up.index[...])
    np.testing.assert_allclose(g_v, picked, rtol=1e-4, atol=1e-6)
    assert float(jnp.abs(g_a).max()) > 0 and float(jnp.abs(g_v).max()) > 0


def _expert_effective(program: Program, params, structure) -> dict[str, np.ndarray]:
    model = program.model_def.merge(params, structure)
    return {f"{i}/{w}": np.asarray(getattr(model.layers[i].moe, w).effective())
            for i in range(2) for w in ("gate", "up", "down")}


@pytest.mark.parametrize("method, extra", [
    ("relora", ["lowrank.relora.merge_every=2"]),
    ("lowrank", ["lowrank.refactor.every=2"]),
])
def test_merges_and_refactorization_keep_every_expert_weight(method, extra):
    run = Run(f"lowrank={method}", EXPERT_RULES, *extra)
    engine, s = run.program.lowrank, run.state
    assert any("moe" in layer.name for layer in engine.layers)
    # fresh random factors everywhere (at init B = 0 for relora: a merge would be trivial)
    leaves, treedef = jax.tree.flatten(s.params)
    keys = jax.random.split(jax.random.key(4), len(leaves))
    params = jax.tree.unflatten(treedef, [x + 0.1 * jax.random.normal(k, x.shape, x.dtype)
                                          for x, k in zip(leaves, keys)])
    before = _expert_effective(run.program, params, s.structure)
    work = engine._merge if method == "relora" else engine._refactor
    params, structure, _ = work(params, s.structure, s.opt_state, jax.random.key(9))
    after = _expert_effective(run.program, params, structure)
    for name in before:
        np.testing.assert_allclose(after[name], before[name], rtol=1e-4, atol=1e-6)
    up = params["layers"][0]["moe"]["up"]
    a, b = np.asarray(up["a"], np.float64), np.asarray(up["b"], np.float64)
    if method == "relora":  # B zeroed, each expert its own fresh A
        assert np.all(b == 0) and not np.allclose(a[0], a[1])
    else:  # balanced per expert: A_e^T A_e = B_e B_e^T (diagonal S)
        for e in range(E):
            np.testing.assert_allclose(a[e].T @ a[e], b[e] @ b[e].T, atol=1e-5)


def test_expert_factors_supports_and_frozen_kernels_are_sharded_over_expert():
    config = load_config(None, [*MODEL, "lowrank=relora", EXPERT_RULES, "parallel.expert=4",
                                "parallel.data=2"])
    program = Program.build(config)
    mesh = parallel.make_mesh(config.parallel, jax.devices()[:8])
    layout = state_layout(program, mesh, parallel.sharding_rules(config.parallel))
    stack = layout.state.params["layers"][0]["moe"]["up"]
    frozen = layout.state.structure["layers"][0]["moe"]["up"]["w0"]
    for sharding in (stack["a"], stack["b"], frozen):
        assert sharding.spec[0] == "expert"
    config = load_config(None, [*MODEL, "lowrank=sltrain", EXPERT_RULES, "parallel.expert=4",
                                "parallel.data=2"])
    program = Program.build(config)
    layout = state_layout(program, mesh, parallel.sharding_rules(config.parallel))
    assert layout.state.params["layers"][0]["moe"]["up"]["values"].spec[0] == "expert"
    assert layout.state.structure["layers"][0]["moe"]["up"]["index"].spec[0] == "expert"


@pytest.mark.slow  # ~30 s; the shardings it relies on are checked in the default suite above
def test_sltrain_experts_train_under_expert_parallelism_like_one_device():
    single = Run("lowrank=sltrain", EXPERT_RULES, "parallel.data=1")
    sharded = Run("lowrank=sltrain", EXPERT_RULES, "parallel.expert=4", "parallel.data=2",
                  n_devices=8)
    for tokens in _batches(2):
        a, b = single.step(tokens), sharded.step(tokens)
        assert float(b["loss"]) == pytest.approx(float(a["loss"]), rel=2e-5)
    for x, y in zip(jax.tree.leaves(single.state.params), jax.tree.leaves(sharded.state.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)


def test_memory_report_counts_expert_factors_and_supports():
    config = load_config(None, [*MODEL, "lowrank=sltrain", "lowrank.density=0.1",
                                EXPERT_RULES])
    program = Program.build(config)
    mesh = parallel.make_mesh(config.parallel)
    report = memory_report(program.model_def,
                           state_layout(program, mesh, parallel.sharding_rules(config.parallel)
                                        ).abstract)
    nnz = int(0.1 * D * F)
    row = report["sltrain_experts"]
    assert row["layers"] == 6  # gate, up, down in 2 layers
    assert row["trainable_params"] == 6 * E * (R * (D + F) + nnz)
    assert row["structure_bytes"] == 6 * E * nnz * 4  # int32 indices, no dense S


@pytest.mark.parametrize("overrides, needle", [
    (["lowrank=lost", EXPERT_RULES], "layers/0/moe/gate.*no 'lost' form"),
    (["lowrank=sst", EXPERT_RULES], "layers/0/moe/gate.*no 'sst' form"),
    (["lowrank=galore", EXPERT_RULES], r"expert stack 'layers/0/moe/\w+' for GaLore"),
    (["lowrank=lowrank", "lowrank.rank=40", EXPERT_RULES], "layers/0/moe/gate.*rank=40"),
])
def test_what_experts_cannot_take_is_a_clear_start_up_error(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        Program.build(load_config(None, [*MODEL, *overrides]))
