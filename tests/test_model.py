import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from spjax.config import load_config
from spjax.model.linear import DenseLinear
from spjax.model.transformer import Transformer, apply_rope, closed_form_param_count, rope_tables


def tiny_config(**changes):
    config = load_config(None, ["model=tiny"]).model
    return dataclasses.replace(config, vocab_size=61, **changes)


@pytest.mark.parametrize("preset, published_millions", [
    ("60m", 58.07), ("130m", 134.11), ("350m", 367.97), ("1b", 1339.08)])
def test_param_count_matches_closed_form_and_papers(preset, published_millions):
    config = load_config(None, [f"model={preset}"]).model
    model = nnx.eval_shape(lambda: Transformer(config, nnx.Rngs(0)))
    count = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert count == closed_form_param_count(config)
    assert round(count / 1e6, 2) == published_millions


def test_every_projection_comes_from_the_linear_factory_with_axes():
    model = Transformer(tiny_config(), nnx.Rngs(0))
    linears = [(path, m) for path, m in nnx.iter_graph(model) if isinstance(m, DenseLinear)]
    names = {"/".join(map(str, p)) for p, _ in linears}
    assert len(linears) == 7 * model.config.n_layers + 1  # q k v o gate up down, + LM head
    assert "lm_head" in names and "layers/0/mlp/down" in names
    for _, m in linears:
        assert m.kernel.get_metadata()["axes"] is not None


def test_init_statistics():
    config = load_config(None, ["model=60m", "model.vocab_size=1000"]).model
    model = Transformer(config, nnx.Rngs(3))
    w = np.asarray(model.layers[0].mlp.up.kernel[...])
    assert abs(w.std() - 0.02) < 5e-4 and abs(w.mean()) < 5e-4
    assert abs(np.asarray(model.embed[...]).std() - 0.02) < 5e-4
    np.testing.assert_array_equal(np.asarray(model.layers[0].attn_norm.scale[...]), 1.0)


def _reference_forward(model: Transformer, tokens: np.ndarray) -> np.ndarray:
    """Plain float64 numpy LLaMA forward, written independently of the module code."""
    cfg = model.config
    get = lambda v: np.asarray(v[...], np.float64)  # noqa: E731

    def rms(x, scale):
        return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg.norm_eps) * scale

    b, t = tokens.shape
    h, k = cfg.n_heads, cfg.head_dim
    inv = 1.0 / cfg.rope_theta ** (np.arange(0, k, 2) / k)
    ang = np.arange(t)[:, None] * inv[None]
    cos, sin = np.cos(ang), np.sin(ang)

    def rope(x):  # x [b, t, h, k]; pairs (i, i + k/2) rotate by angle i
        x1, x2 = x[..., : k // 2], x[..., k // 2:]
        c, s = cos[None, :, None], sin[None, :, None]
        return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], -1)

    x = get(model.embed)[tokens]
    causal = np.tril(np.ones((t, t), bool))
    for layer in model.layers:
        y = rms(x, get(layer.attn_norm.scale))
        q = rope((y @ get(layer.attn.q.kernel)).reshape(b, t, h, k))
        kk = rope((y @ get(layer.attn.k.kernel)).reshape(b, t, h, k))
        v = (y @ get(layer.attn.v.kernel)).reshape(b, t, h, k)
        scores = np.einsum("bqhd,bkhd->bhqk", q, kk) / np.sqrt(k)
        scores = np.where(causal, scores, -np.inf)
        p = np.exp(scores - scores.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        att = np.einsum("bhqk,bkhd->bqhd", p, v).reshape(b, t, h * k)
        x = x + att @ get(layer.attn.o.kernel)
        y = rms(x, get(layer.mlp_norm.scale))
        gate = y @ get(layer.mlp.gate.kernel)
        x = x + ((gate / (1 + np.exp(-gate))) * (y @ get(layer.mlp.up.kernel))) @ get(
            layer.mlp.down.kernel)
    return rms(x, get(model.final_norm.scale)) @ get(model.lm_head.kernel)


def test_forward_matches_independent_float64_reference():
    model = Transformer(tiny_config(compute_dtype="float32"), nnx.Rngs(1))
    tokens = np.random.default_rng(0).integers(0, 61, size=(2, 24))
    ours = np.asarray(model(jnp.asarray(tokens)))
    ref = _reference_forward(model, tokens)
    assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) < 1e-5


def test_bf16_compute_is_close_to_fp32():
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 61, size=(2, 32)))
    fp32 = Transformer(tiny_config(compute_dtype="float32"), nnx.Rngs(2))(tokens)
    bf16 = Transformer(tiny_config(compute_dtype="bfloat16"), nnx.Rngs(2))(tokens)
    assert bf16.dtype == jnp.float32  # logits stay fp32 for the loss
    rel = jnp.linalg.norm(bf16 - fp32) / jnp.linalg.norm(fp32)
    assert 0 < rel < 3e-2


def test_causal_future_tokens_do_not_change_past_logits():
    model = Transformer(tiny_config(compute_dtype="float32"), nnx.Rngs(0))
    tokens = np.random.default_rng(2).integers(0, 61, size=(1, 16))
    changed = tokens.copy()
    changed[0, 10:] = (changed[0, 10:] + 7) % 61
    a, b = model(jnp.asarray(tokens)), model(jnp.asarray(changed))
    np.testing.assert_allclose(a[:, :10], b[:, :10], rtol=1e-6, atol=1e-6)
    assert not np.allclose(a[:, 10:], b[:, 10:])


def test_rope_scores_depend_only_on_relative_position():
    k = 16
    cos, sin = rope_tables(64, k, 10000.0)
    rng = np.random.default_rng(3)
    q = jnp.asarray(rng.normal(size=(1, 1, 1, k)), jnp.float32)
    key = jnp.asarray(rng.normal(size=(1, 1, 1, k)), jnp.float32)

    def score(i, j):
        qi = apply_rope(jnp.broadcast_to(q, (1, 64, 1, k)), cos, sin)[0, i, 0]
        kj = apply_rope(jnp.broadcast_to(key, (1, 64, 1, k)), cos, sin)[0, j, 0]
        return float(qi @ kj)

    assert score(10, 3) == pytest.approx(score(40, 33), rel=1e-4)
    assert score(10, 3) != pytest.approx(score(10, 4), rel=1e-3)


def _remat_grads(config):
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, 61, size=(2, 16)))
    model = Transformer(config, nnx.Rngs(5))
    graphdef, params = nnx.split(model, nnx.Param)
    loss = lambda p: jnp.mean(nnx.merge(graphdef, p)(tokens) ** 2)  # noqa: E731
    return jax.jit(jax.grad(loss))(params)  # compiled, as in the train step


@pytest.fixture(scope="module")
def plain_grads():
    """The gradients without remat, the reference of both remat policies (computed once)."""
    return _remat_grads(tiny_config(compute_dtype="float32"))


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_gives_the_same_gradients(remat, plain_grads):
    plain = plain_grads
    rematted = _remat_grads(tiny_config(compute_dtype="float32", remat=remat))
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(rematted)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
