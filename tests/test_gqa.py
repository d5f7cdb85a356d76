"""Grouped-query (model.n_kv_heads; MQA at 1) and sparse-query (model.n_q_heads) attention:
the layer against an explicit float64 reference that repeats the key/value heads, on the
dense path and the block-sparse paths (reference and Pallas interpret); parameter and FLOP
counts against their closed forms; config errors; tensor-parallel training equal to single
device."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import TrainHarness, assert_sharded_equals_single
from spjax.config import load_config
from spjax.errors import ConfigError
from spjax.config import attention_patterns
from spjax.model.structures import LinearFactory, dense_everywhere
from spjax.model.transformer import (Attention, Transformer, closed_form_param_count,
                                     rope_tables)
from spjax.train import accounting as flops

# d 64, 4 heads of 16
TINY = ["model=tiny", "model.d_model=64", "model.d_ff=96", "model.n_heads=4",
        "model.n_layers=2", "model.vocab_size=61", "model.compute_dtype=float32",
        "model.attention_pattern.block=16", "data.seq_len=64"]


def _config(*overrides):
    return load_config(None, [*TINY, *overrides])


def _reference(layer: Attention, x: np.ndarray, token_mask: np.ndarray) -> np.ndarray:
    """float64 numpy: project, rotate, repeat each key/value head for its H/G query heads,
    masked softmax, output projection."""
    get = lambda m: np.asarray(m.kernel[...], np.float64)  # noqa: E731
    b, t, _ = x.shape
    hd, h, g = layer.head_dim, layer.q_heads, layer.kv_heads
    x = np.asarray(x, np.float64)
    q = (x @ get(layer.q)).reshape(b, t, h, hd)
    k = (x @ get(layer.k)).reshape(b, t, g, hd)
    v = (x @ get(layer.v)).reshape(b, t, g, hd)
    inv = 1.0 / 10000.0 ** (np.arange(0, hd, 2) / hd)
    ang = np.arange(t)[:, None] * inv[None]
    cos, sin = np.cos(ang)[None, :, None], np.sin(ang)[None, :, None]

    def rope(y):
        y1, y2 = y[..., : hd // 2], y[..., hd // 2:]
        return np.concatenate([y1 * cos - y2 * sin, y2 * cos + y1 * sin], -1)

    q, k = rope(q), rope(k)
    k, v = np.repeat(k, h // g, axis=2), np.repeat(v, h // g, axis=2)  # head i -> kv i // (h/g)
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd)
    s = np.where(token_mask[None, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = np.einsum("bhqk,bkhd->bqhd", p, v).reshape(b, t, h * hd)
    return out @ get(layer.o)


CASES = {
    "gqa": (["model.n_kv_heads=2"], "dense", "xla"),
    "mqa": (["model.n_kv_heads=1"], "dense", "xla"),
    "sqa": (["model.n_q_heads=2", "model.n_kv_heads=1"], "dense", "xla"),
    "gqa-sparse-ref": (["model.n_kv_heads=2"], "global_local", "xla"),
    "mqa-sparse-pallas": (["model.n_kv_heads=1"], "global_local", "interpret"),
    "sqa-sparse-pallas": (["model.n_q_heads=2", "model.n_kv_heads=2"], "global_local",
                          "interpret"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_attention_equals_the_repeated_kv_reference(case):
    heads, pattern, kernel = CASES[case]
    config = _config(*heads, f'model.attention_pattern.rules=[[".*", {pattern}]]',
                     "model.attention_pattern.window=16",
                     "model.attention_pattern.global_tokens=16",
                     f"model.attention_pattern.kernel={kernel}").model
    linear = LinearFactory(dense_everywhere, config.init_std, jnp.float32, jnp.float32)
    layer = Attention("layers/0/attn", config, linear, nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 64, 64))
    cos, sin = rope_tables(64, config.head_dim, config.rope_theta)
    out = jax.jit(lambda x: layer(x, cos, sin))(x)
    blocks = attention_patterns.build(pattern, seq_len=64, block=16, window=16,
                                      global_tokens=16)
    token_mask = np.kron(blocks, np.ones((16, 16), bool)).astype(bool) & np.tri(64, dtype=bool)
    np.testing.assert_allclose(np.asarray(out), _reference(layer, np.asarray(x), token_mask),
                               rtol=1e-4, atol=1e-5)


def test_default_heads_are_multi_head_attention():
    config = _config().model
    assert (config.q_heads, config.kv_heads) == (4, 4)
    model = nnx.eval_shape(lambda: Transformer(config, nnx.Rngs(0)))
    attn = model.layers[0].attn
    assert [m.kernel.shape for m in (attn.q, attn.k, attn.v, attn.o)] == [(64, 64)] * 4


def _param_count(config):
    model = nnx.eval_shape(lambda: Transformer(config, nnx.Rngs(0)))
    return model, sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("heads, q, kv", [([], 4, 4), (["model.n_kv_heads=1"], 4, 1),
                                          (["model.n_q_heads=2"], 2, 2),
                                          (["model.n_q_heads=2", "model.n_kv_heads=1"], 2, 1)])
def test_param_count_and_flops_follow_the_head_counts(heads, q, kv):
    config = _config(*heads).model
    d, f, hd, v, n, t = 64, 96, 16, 61, 2, 64
    model, count = _param_count(config)
    attn = model.layers[0].attn
    assert attn.q.kernel.shape == (d, q * hd) and attn.o.kernel.shape == (q * hd, d)
    assert attn.k.kernel.shape == attn.v.kernel.shape == (d, kv * hd)
    attention = d * q * hd + 2 * d * kv * hd + q * hd * d
    assert count == closed_form_param_count(config) == \
        2 * v * d + d + n * (attention + 2 * d + 3 * d * f)
    assert flops.matmul_params(config) == d * v + n * (attention + 3 * d * f)
    assert flops.train_flops_per_token(config, t) == \
        6 * flops.matmul_params(config) + 6 * n * t * q * hd
    assert flops.attention_flops_per_token(config, t) == (6 * n * t * q * hd,) * 2
    if q == kv == 4:  # the defaults: 4d^2 per layer and 6 n d T, as before
        assert attention == 4 * d * d and q * hd == d
    else:
        assert count < _param_count(_config().model)[1]


def test_sparse_query_attention_flops_scale_with_query_heads():
    full, sqa = _config().model, _config("model.n_q_heads=2", "model.n_kv_heads=2").model
    full_attn = flops.train_flops_per_token(full, 64) - 6 * flops.matmul_params(full)
    sqa_attn = flops.train_flops_per_token(sqa, 64) - 6 * flops.matmul_params(sqa)
    assert sqa_attn == full_attn / 2


@pytest.mark.parametrize("overrides, needle", [
    (["model.n_kv_heads=3"], r"model.n_heads \(4\) must be a multiple of model.n_kv_heads \(3\)"),
    (["model.n_q_heads=8"], "more query heads than allowed"),
    (["model.n_q_heads=2", "model.n_kv_heads=4"], r"model.n_kv_heads \(4\) is more than"),
    (["model.n_q_heads=3", "model.n_kv_heads=2"], "model.n_q_heads .3. must be a multiple"),
    (["model.n_kv_heads=-1"], "model.n_kv_heads must be >= 0"),
    (["model.n_kv_heads=1", "parallel.tensor=2"], r"model.n_kv_heads \(1\) must be divisible "
                                                  r"by parallel.tensor \(2\)"),
])
def test_bad_head_counts_are_one_line_config_errors(overrides, needle):
    with pytest.raises(ConfigError, match=needle) as error:
        _config(*overrides)
    assert "\n" not in str(error.value)


def test_mqa_with_heads_not_split_over_tensor_is_allowed():
    rules = '[["batch", [data, fsdp, expert]], ["(mlp|vocab)", tensor], [".*", null]]'
    config = _config("model.n_kv_heads=1", "parallel.tensor=2", f"parallel.rules={rules}")
    assert config.model.kv_heads == 1
    # without grouping q, k and v split alike, even mid-head, as before
    assert _config("model.n_heads=2", "parallel.tensor=4").model.kv_heads == 2


def Run(*overrides: str, n_devices: int = 1) -> TrainHarness:
    return TrainHarness(_config("model.n_kv_heads=2", "data.batch_size=8", "train.steps=20",
                                "optimizer.warmup_steps=1", "optimizer.lr=3e-3", *overrides),
                        n_devices)


def test_gqa_tensor_parallel_training_equals_single_device():
    single = Run("parallel.data=1")
    sharded = Run("parallel.tensor=2", "parallel.data=4", n_devices=8)
    k = sharded.state.params["layers"][0]["attn"]["k"]["kernel"]
    assert k.shape == (64, 32) and k.sharding.spec[1] == "tensor"  # whole kv heads per shard
    tokens = np.random.default_rng(0).integers(0, 61, size=(8, 65), dtype=np.int32)
    losses = []
    for _ in range(4):  # one batch again and again: the loss must fall
        a, b = single.step(tokens), sharded.step(tokens)
        for key in ("loss", "grad_norm"):
            assert float(b[key]) == pytest.approx(float(a[key]), rel=2e-5), key
        losses.append(float(a["loss"]))
    assert losses[-1] < losses[0] - 0.05, losses
    # Adam turns reduction-order noise in near-zero gradients into steps of up to lr (3e-3):
    # a few elements differ by ~2e-6, so the bound is 1e-5, well under one step
    for x, y in zip(jax.tree.leaves(single.state.params), jax.tree.leaves(sharded.state.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-5)


def test_sharded_gqa_kernels_equal_single_device():
    """Pallas (interpret) in shard_map: q heads and kv heads split over tensor line up."""
    config = _config("model.n_kv_heads=2", "model.attention_pattern.window=32",
                     "model.attention_pattern.kernel=interpret",
                     'model.attention_pattern.rules=[[".*", sliding_window]]',
                     "parallel.data=4", "parallel.tensor=2")
    model = Transformer(dataclasses.replace(config.model, n_layers=1), nnx.Rngs(6))
    tokens = jnp.asarray(np.random.default_rng(7).integers(0, 61, size=(4, 64)))
    assert_sharded_equals_single(model, tokens, config)
