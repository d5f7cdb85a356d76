import dataclasses
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from spjax.config import load_config
from spjax.errors import ConfigError
from spjax.model import lowrank, variables
from spjax.model.linear import DenseLinear, LinearSpec, normal_init
from spjax.model.structures import STRUCTURES
from spjax.model.transformer import Transformer

D_IN, D_OUT, STD, R = 48, 40, 0.02, 6
SPECS = {
    "lowrank": LinearSpec("lowrank", R, 12.0),
    "sltrain": LinearSpec("sltrain", R, 12.0, 0.05),
    "relora": LinearSpec("relora", R, 12.0),
    "lost": LinearSpec("lost", R, 0.0, 0.2),
    "sst": LinearSpec("sst", R),
}
AXES = ("embed", "mlp")


def build(name, seed=0, spec=None, d_in=D_IN, d_out=D_OUT):
    spec = spec or SPECS[name]
    return STRUCTURES[spec.structure](
        d_in, d_out, axes=AXES, init_std=STD, param_dtype=jnp.float32,
        compute_dtype=jnp.float32, out_dtype=jnp.float32, rngs=nnx.Rngs(seed), spec=spec)


def perturbed(name, seed=0):
    """A layer whose every parameter is random and non-zero (B = 0 at init would hide bugs)."""
    layer = build(name, seed)
    params = nnx.state(layer, nnx.Param)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(100 + seed), len(leaves))
    noisy = [x + 0.1 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    nnx.update(layer, jax.tree.unflatten(treedef, noisy))
    return layer


def f64(v):
    return np.asarray(v[...] if isinstance(v, nnx.Variable) else v, np.float64)


def formula(name, layer):
    """The dense weight from the stored arrays, in float64, written independently of the code."""
    if name == "sst":
        return f64(layer.u) * f64(layer.s)[None, :] @ f64(layer.v)
    scale = SPECS[name].alpha / SPECS[name].rank if name != "lost" else 1.0
    w = scale * f64(layer.a) @ f64(layer.b)
    if name == "sltrain":
        flat = w.reshape(-1)
        flat[np.asarray(layer.index[...])] += f64(layer.values)
        w = flat.reshape(w.shape)
    if name == "relora":
        w = w + f64(layer.w0)
    if name == "lost":
        w[:, np.asarray(layer.channels[...])] += f64(layer.values)
    return w


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def random_x(seed, shape=(3, 5, D_IN)):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def leaves_of(layer):
    return jax.tree.leaves(nnx.state(layer), is_leaf=lambda x: isinstance(x, nnx.Variable))


def w0_of(seed, d_in=D_IN, d_out=D_OUT):
    """LOST/SST draw their dense W0 first from rngs.params(): recompute it from the stream."""
    return np.asarray(normal_init(STD)(nnx.Rngs(seed).params(), (d_in, d_out), jnp.float32),
                      np.float64)


# ----------------------------------------------------------------------------- every structure


@pytest.mark.parametrize("name", list(SPECS))
def test_forward_and_effective_kernel_match_the_formula(name):
    layer = perturbed(name, seed=1)
    w_ref = formula(name, layer)
    assert rel(layer.effective_kernel(), w_ref) < 1e-5
    x = random_x(2)
    y = layer(x)
    assert y.shape == (3, 5, D_OUT) and y.dtype == jnp.float32
    assert rel(y, np.asarray(x, np.float64) @ w_ref) < 1e-5
    assert rel(y, x @ layer.effective_kernel()) < 1e-5


FACTORS = {"a": (nnx.Param, ("embed", "rank")), "b": (nnx.Param, ("rank", "mlp"))}
VARIABLES = {
    "lowrank": FACTORS,
    "sltrain": {**FACTORS, "values": (nnx.Param, (None,)),
                "index": (variables.SparseIndex, (None,))},
    "relora": {**FACTORS, "w0": (variables.FrozenKernel, AXES)},
    "lost": {**FACTORS, "values": (nnx.Param, ("embed", None)),
             "channels": (variables.SparseIndex, (None,))},
    "sst": {"u": (nnx.Param, ("embed", "rank")), "s": (nnx.Param, (None,)),
            "v": (nnx.Param, ("rank", "mlp")),
            "selection": (variables.SpectralSelection, (None,))},
}


@pytest.mark.parametrize("name", list(SPECS))
def test_variables_have_their_classes_and_axes(name):
    layer = build(name)
    assert set(nnx.to_pure_dict(nnx.state(layer))) == set(VARIABLES[name])
    for attr, (cls, axes) in VARIABLES[name].items():
        var = getattr(layer, attr)
        assert type(var) is cls and var.get_metadata()["axes"] == axes
        assert len(axes) == var[...].ndim


def test_abstract_and_jitted_init_match_eager():
    def init():
        layers = {name: build(name, seed=3) for name in SPECS}
        return ({name: nnx.to_pure_dict(nnx.state(layer)) for name, layer in layers.items()},
                {name: layer.effective_kernel() for name, layer in layers.items()})

    abstract = nnx.eval_shape(lambda: {name: build(name, seed=3) for name in SPECS})
    eager, eager_w = init()
    jitted, jitted_w = jax.jit(init)()  # one compile for all five structures
    for name in SPECS:
        shapes = nnx.to_pure_dict(nnx.state(abstract[name]))
        assert (jax.tree.map(lambda v: (v.shape, v.dtype), shapes)
                == jax.tree.map(lambda v: (v.shape, v.dtype), eager[name]))
        # Supports and selections exactly; SVD factors may differ in ill-conditioned
        # directions between compiled and eager runs, so floats are compared through W.
        for a, b in zip(jax.tree.leaves(eager[name]), jax.tree.leaves(jitted[name])):
            if not jnp.issubdtype(a.dtype, jnp.floating):
                np.testing.assert_array_equal(a, b)
        assert rel(jitted_w[name], eager_w[name]) < 1e-5


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("rank", [0, min(D_IN, D_OUT) + 1])
def test_bad_rank_names_the_key(name, rank):
    spec = dataclasses.replace(SPECS[name], rank=rank)
    with pytest.raises(ConfigError, match=r"48x40.*lowrank\.rank"):
        build(name, spec=spec)


@pytest.mark.parametrize("name", ["sltrain", "lost"])
@pytest.mark.parametrize("density", [0.0, 1.0])
def test_bad_density_names_the_key(name, density):
    spec = dataclasses.replace(SPECS[name], density=density)
    with pytest.raises(ConfigError, match=r"48x40.*lowrank\.density"):
        build(name, spec=spec)


@pytest.mark.parametrize("name", ["lowrank", "sltrain", "relora"])
def test_zero_alpha_names_the_key(name):
    with pytest.raises(ConfigError, match=r"lowrank\.alpha"):
        build(name, spec=dataclasses.replace(SPECS[name], alpha=0.0))


# ----------------------------------------------------------------------------- lowrank, sltrain


def test_lowrank_param_count_and_kaiming_init():
    layer = build("lowrank")
    params = jax.tree.leaves(nnx.state(layer, nnx.Param))
    assert sum(p.size for p in params) == R * (D_IN + D_OUT)
    for factor, fan_in in ((layer.a[...], D_IN), (layer.b[...], R)):
        bound = 1 / math.sqrt(fan_in)
        assert np.abs(factor).max() <= bound and np.abs(factor).max() > 0.8 * bound


def test_sltrain_stores_no_dense_array_and_a_valid_support():
    layer = build("sltrain", seed=4)
    for var in leaves_of(layer):
        assert var[...].size < D_IN * D_OUT
    nnz = math.floor(0.05 * D_IN * D_OUT)
    index = np.asarray(layer.index[...])
    assert index.dtype == np.int32 and index.shape == (nnz,) and layer.values[...].shape == (nnz,)
    assert np.all(np.diff(index) > 0)  # sorted and unique
    assert index.min() >= 0 and index.max() < D_IN * D_OUT
    assert not np.array_equal(index, np.asarray(build("sltrain", seed=5).index[...]))
    np.testing.assert_array_equal(layer.b[...], 0.0)
    # at step 0 the layer is S alone: non-zeros exactly at the support
    w = np.asarray(layer.effective_kernel()).reshape(-1)
    np.testing.assert_array_equal(np.flatnonzero(w), index)
    bound = 1 / math.sqrt(D_IN)
    assert np.abs(layer.values[...]).max() <= bound


def test_sltrain_value_gradient_is_the_gather_of_the_dense_gradient():
    layer = perturbed("sltrain", seed=6)
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
    x, g = random_x(7), random_x(8, (3, 5, D_OUT))
    loss = lambda p: jnp.sum(nnx.merge(graphdef, p, rest)(x) * g)  # noqa: E731
    grads = jax.grad(loss)(params)
    dense_grad = np.einsum("bti,bto->io", np.asarray(x, np.float64), np.asarray(g, np.float64))
    expected = dense_grad.reshape(-1)[np.asarray(layer.index[...])]
    assert rel(grads["values"][...], expected) < 1e-5


@pytest.mark.parametrize("name", ["lowrank", "sltrain"])
def test_refactorize_keeps_the_function_and_balances_the_factors(name):
    layer = perturbed(name, seed=9)
    x = random_x(10)
    before_w, before_y = np.asarray(layer.effective_kernel()), np.asarray(layer(x))
    a, b = lowrank.refactorize(layer.a[...], layer.b[...])
    layer.a[...], layer.b[...] = a, b
    assert rel(layer.effective_kernel(), before_w) < 1e-5
    assert rel(layer(x), before_y) < 1e-5
    gram_a, gram_b = f64(a).T @ f64(a), f64(b) @ f64(b).T
    assert rel(gram_a, gram_b) < 1e-5
    off_diagonal = gram_a - np.diag(np.diag(gram_a))
    assert np.abs(off_diagonal).max() < 1e-5 * np.abs(gram_a).max()  # A^T A = S, diagonal


# ----------------------------------------------------------------------------- relora


def test_relora_starts_at_w0_and_merge_keeps_the_function():
    fresh = build("relora", seed=11)
    assert rel(fresh.effective_kernel(), fresh.w0[...]) == 0.0
    assert isinstance(fresh.w0, variables.FrozenKernel) and fresh.w0.get_metadata()["axes"] == AXES
    layer = perturbed("relora", seed=11)
    x = random_x(12)
    before = np.asarray(layer(x))
    old_a = np.asarray(layer.a[...])
    w0, a, b = lowrank.relora_merge(layer.w0[...], layer.a[...], layer.b[...], layer.scale,
                                    jax.random.key(13))
    layer.w0[...], layer.a[...], layer.b[...] = w0, a, b
    assert rel(layer(x), before) < 1e-5
    np.testing.assert_array_equal(b, 0.0)
    bound = 1 / math.sqrt(D_IN)
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.8 * bound
    assert not np.allclose(a, old_a)


# ----------------------------------------------------------------------------- lost


def test_lost_init_is_w0_on_kept_channels_and_its_truncation_elsewhere():
    seed, spec = 14, SPECS["lost"]
    layer = build("lost", seed=seed)
    w0 = w0_of(seed)
    u, s, vt = np.linalg.svd(w0, full_matrices=False)
    truncated = (u[:, :R] * s[:R]) @ vt[:R]
    k = max(1, round(spec.density * D_OUT))
    channels = np.asarray(layer.channels[...])
    assert channels.dtype == np.int32 and channels.shape == (k,) and np.all(np.diff(channels) > 0)
    kept = np.zeros(D_OUT, bool)
    kept[channels] = True
    w = np.asarray(layer.effective_kernel(), np.float64)
    assert rel(w[:, kept], w0[:, kept]) < 1e-5
    assert rel(w[:, ~kept], truncated[:, ~kept]) < 1e-5
    norms = np.linalg.norm(w0 - truncated, axis=0)
    assert norms[kept].min() > norms[~kept].max()
    gram_a, gram_b = f64(layer.a).T @ f64(layer.a), f64(layer.b) @ f64(layer.b).T
    np.testing.assert_allclose(np.diag(gram_a), s[:R], rtol=1e-5)
    np.testing.assert_allclose(np.diag(gram_b), s[:R], rtol=1e-5)


# ----------------------------------------------------------------------------- sst


def test_sst_init_is_the_svd_of_w0_with_the_top_r_selected():
    seed = 15
    layer = build("sst", seed=seed)
    assert rel(layer.effective_kernel(), w0_of(seed)) < 1e-5
    m = min(D_IN, D_OUT)
    u, v = f64(layer.u), f64(layer.v)
    np.testing.assert_allclose(u.T @ u, np.eye(m), atol=1e-5)
    np.testing.assert_allclose(v @ v.T, np.eye(m), atol=1e-5)
    sel, s = np.asarray(layer.selection[...]), f64(layer.s)
    assert sel.dtype == bool and sel.sum() == R and s[sel].min() >= s[~sel].max()


def _inclusion_probabilities(p, r):
    """Exact P(i among r successive draws without replacement), by enumerating orderings."""
    incl = np.zeros(len(p))
    for order in itertools.permutations(range(len(p)), r):
        prob, left = 1.0, 1.0
        for i in order:
            prob *= p[i] / left
            left -= p[i]
        incl[list(order)] += prob
    return incl


@pytest.mark.parametrize("r", [1, 3])
def test_sst_sample_draws_r_distinct_indices_with_the_sst_probabilities(r):
    s = jnp.asarray([5.0, 3.0, 1.0, 0.5, 0.2, 0.1])
    m, n = s.shape[0], 20000
    p = 0.5 * (1 / m + np.asarray(s) / float(s.sum()))
    draws = jax.jit(jax.vmap(lambda key: lowrank.sst_sample(s, r, key)))(
        jax.random.split(jax.random.key(16), n))
    draws = np.asarray(draws)
    assert draws.dtype == bool and np.all(draws.sum(axis=1) == r)
    freq, expected = draws.mean(axis=0), _inclusion_probabilities(p, r)
    sigma = np.sqrt(expected * (1 - expected) / n)
    assert np.all(np.abs(freq - expected) < 5 * sigma), (freq, expected)
    assert np.abs(freq - r / m).max() > 0.1  # far from uniform: the test can tell


def test_sst_enhanced_grads_are_dl_dw_times_the_singular_vectors():
    layer = perturbed("sst", seed=17)
    selection = np.zeros(min(D_IN, D_OUT), bool)
    selection[[0, 3, 7, 20]] = True
    layer.selection[...] = jnp.asarray(selection)
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
    x, g = random_x(18), random_x(19, (3, 5, D_OUT))
    grads = jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p, rest)(x) * g))(params)
    gu, gs, gv = lowrank.sst_enhanced_grads(grads["u"][...], grads["s"][...], grads["v"][...],
                                            layer.s[...], layer.selection[...])
    dl_dw = np.einsum("bti,bto->io", np.asarray(x, np.float64), np.asarray(g, np.float64))
    u, v = f64(layer.u), f64(layer.v)
    assert rel(np.asarray(gu)[:, selection], (dl_dw @ v.T)[:, selection]) < 1e-5
    assert rel(np.asarray(gv)[selection], (u.T @ dl_dw)[selection]) < 1e-5
    np.testing.assert_array_equal(np.asarray(gu)[:, ~selection], 0.0)
    np.testing.assert_array_equal(np.asarray(gv)[~selection], 0.0)
    assert rel(gs, np.einsum("im,io,mo->m", u, dl_dw, v)) < 1e-5  # every s_i: U_i^T G V_i


def test_sst_renormalize_and_reorthogonalize_keep_the_matrix():
    layer = perturbed("sst", seed=20)  # noise makes U, V non-orthogonal, non-unit
    u, s, v = layer.u[...], layer.s[...], layer.v[...]
    w = formula("sst", layer)
    nu, ns, nv = lowrank.sst_renormalize(u, s, v)
    assert rel(f64(nu) * f64(ns) @ f64(nv), w) < 1e-5
    np.testing.assert_allclose(np.linalg.norm(nu, axis=0), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(nv, axis=1), 1.0, rtol=1e-5)
    ou, os_, ov = lowrank.sst_reorthogonalize(u, s, v)
    assert ou.shape == u.shape and os_.shape == s.shape and ov.shape == v.shape
    assert rel(f64(ou) * f64(os_) @ f64(ov), w) < 1e-5
    m = s.shape[0]
    np.testing.assert_allclose(f64(ou).T @ f64(ou), np.eye(m), atol=1e-5)
    np.testing.assert_allclose(f64(ov) @ f64(ov).T, np.eye(m), atol=1e-5)


# ----------------------------------------------------------------------------- in the model


def _train_once(config, assign):
    """Forward and jax.grad of the full model; returns the model and the gradients."""
    model = Transformer(config, nnx.Rngs(0), assign=assign)
    tokens = jnp.asarray(np.random.default_rng(21).integers(0, 61, size=(2, 16)))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    loss = lambda p: jnp.mean(nnx.merge(graphdef, p, rest)(tokens) ** 2)  # noqa: E731
    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    assert np.isfinite(value)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    return model, grads


def _moves(layer_grads):
    return max(np.abs(np.asarray(g)).max() for g in jax.tree.leaves(layer_grads)) > 0


def tiny_config():
    return dataclasses.replace(load_config(None, ["model=tiny"]).model, vocab_size=61)


def test_sltrain_builds_in_the_transformer_and_trains():
    spec = LinearSpec("sltrain", 8, 16.0, 0.03)
    assign = lambda n: spec if "/mlp/" in n or "/attn/" in n else LinearSpec()  # noqa: E731
    model, grads = _train_once(tiny_config(), assign)
    assert isinstance(model.lm_head, DenseLinear)
    assert type(model.layers[0].attn.q) is type(model.layers[-1].mlp.down) is STRUCTURES["sltrain"]
    assert np.abs(np.asarray(grads["layers"][0]["mlp"]["up"]["values"])).max() > 0


def test_every_structure_builds_in_one_model_and_trains():
    projections = ["attn/q", "attn/k", "attn/v", "attn/o", "mlp/gate", "mlp/up", "mlp/down"]
    names = list(SPECS)  # projection j of the block gets names[j % 5]: all five in one layer

    def assign(layer):
        part = layer.split("/", 2)[-1]
        if part not in projections:
            return LinearSpec()
        return LinearSpec(names[projections.index(part) % len(names)], 8, 16.0, 0.03)

    model, grads = _train_once(dataclasses.replace(tiny_config(), n_layers=1), assign)
    for j, part in enumerate(projections):
        first, second = part.split("/")
        layer = getattr(getattr(model.layers[0], first), second)
        assert type(layer) is STRUCTURES[names[j % len(names)]]
        assert _moves(grads["layers"][0][first][second])
