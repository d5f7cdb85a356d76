"""Block-sparse attention in the model, through config: per-layer patterns by rules, the
receptive field a pattern allows, the Pallas kernels (interpret mode) == the reference path,
sharded (shard_map) == single device, FLOP accounting, and config errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import assert_sharded_equals_single
from spjax.config import load_config
from spjax.errors import ConfigError
from spjax.model.transformer import Transformer
from spjax.train import accounting as flops

TINY = ["model=tiny", "model.vocab_size=61", "model.compute_dtype=float32",
        "model.attention_pattern.block=16", "data.seq_len=64"]


def _config(*overrides, rules=None):
    extra = [f"model.attention_pattern.rules={rules}"] if rules else []
    return load_config(None, [*TINY, *extra, *overrides])


def _tokens(seed=0, shape=(2, 64)):
    return jnp.asarray(np.random.default_rng(seed).integers(0, 61, size=shape))


def test_rules_give_each_layer_its_pattern():
    config = _config("model.attention_pattern.window=32",
                     rules='[["layers/[02]/attn", sliding_window], [".*", dense]]')
    model = Transformer(config.model, nnx.Rngs(0))
    assert [block.attn.pattern for block in model.layers] == ["sliding_window", "dense"] * 2


def test_the_default_is_dense_attention():
    config = load_config(None, ["model=tiny"])
    assert config.model.attention_pattern.patterns(4) == {f"layers/{i}/attn": "dense"
                                                          for i in range(4)}


def test_a_window_as_long_as_the_sequence_equals_dense_attention():
    tokens = _tokens()
    dense = Transformer(_config().model, nnx.Rngs(1))(tokens)
    full = _config("model.attention_pattern.window=64",
                   rules='[[".*", sliding_window]]').model
    model = Transformer(full, nnx.Rngs(1))
    assert model.layers[0].attn.pattern == "sliding_window"
    np.testing.assert_allclose(model(tokens), dense, rtol=1e-5, atol=1e-5)


def test_a_sliding_window_limits_what_a_one_layer_model_sees():
    """One layer, window one block (16 tokens): position t sees only its own block."""
    config = dataclasses.replace(
        _config("model.attention_pattern.window=16", rules='[[".*", sliding_window]]').model,
        n_layers=1)
    model = Transformer(config, nnx.Rngs(2))
    tokens = _tokens(3, (1, 64))
    changed = tokens.at[0, 20:24].set((tokens[0, 20:24] + 5) % 61)  # inside block 1
    a, b = model(tokens), model(changed)
    np.testing.assert_array_equal(a[:, :20], b[:, :20])  # the past: causal
    np.testing.assert_array_equal(a[:, 32:], b[:, 32:])  # later blocks: outside the window
    assert not np.allclose(a[:, 24:32], b[:, 24:32])  # the same block: inside the window
    dense = dataclasses.replace(_config().model, n_layers=1)
    da, db = (Transformer(dense, nnx.Rngs(2))(x) for x in (tokens, changed))
    assert not np.allclose(da[:, 32:], db[:, 32:])  # dense attention does see it


def _loss_and_grads(config, tokens):
    model = Transformer(config, nnx.Rngs(4))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p):
        return jnp.mean(nnx.merge(graphdef, p, rest)(tokens) ** 2)

    return jax.jit(jax.value_and_grad(loss))(params)


def test_pallas_kernels_in_the_model_match_the_reference_path():
    rules = '[["layers/0/attn", global_local], ["layers/1/attn", strided], [".*", dense]]'
    sizes = ["model.attention_pattern.window=16", "model.attention_pattern.global_tokens=16",
             "model.attention_pattern.stride=32", "model.n_layers=2"]
    tokens = _tokens(5)
    ref_loss, ref_grads = _loss_and_grads(_config(*sizes, rules=rules).model, tokens)
    loss, grads = _loss_and_grads(
        _config(*sizes, "model.attention_pattern.kernel=interpret", rules=rules).model, tokens)
    assert abs(float(loss) - float(ref_loss)) < 1e-6 * abs(float(ref_loss))
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_mosaic_kernels_in_the_model_match_the_reference_path():
    """kernel=mosaic_interpret (Mosaic GPU kernels under their CPU interpreter) and
    mosaic_fwd's pair (Mosaic forward, Triton backward), in a bf16 model: loss and gradients
    equal the plain-jnp path's (both bf16) to within bf16 rounding of the tiles."""
    sizes = ["model.compute_dtype=bfloat16", "model.n_layers=1", "model.n_heads=2",
             "model.attention_pattern.block=64", "data.seq_len=128",
             "model.attention_pattern.window=64"]
    rules = '[[".*", sliding_window]]'
    tokens = _tokens(3, (1, 128))
    ref_loss, ref_grads = _loss_and_grads(_config(*sizes, rules=rules).model, tokens)
    from spjax.model import sparse_attention

    with pytest.raises(ConfigError, match="kernel=mosaic_fwd runs GPU kernels.*cpu"):
        sparse_attention.resolve_kernel("mosaic_fwd")  # on this CPU machine
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sparse_attention.jax, "default_backend", lambda: "gpu")
        assert sparse_attention.resolve_kernel("mosaic_fwd") == "mosaic,pallas"
    for kernel in ("mosaic_interpret", "mosaic_interpret,interpret"):
        config = _config(*sizes, rules=rules).model
        config = dataclasses.replace(config, attention_pattern=dataclasses.replace(
            config.attention_pattern, kernel=kernel))
        loss, grads = _loss_and_grads(config, tokens)
        assert abs(float(loss) - float(ref_loss)) < 1e-3 * abs(float(ref_loss)), kernel
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
            scale = float(jnp.max(jnp.abs(b))) + 1e-12
            assert float(jnp.max(jnp.abs(a - b))) < 2.5e-2 * scale, kernel  # 1.2% measured


def test_auto_kernel_is_mosaic_on_hopper_at_block_128_in_16_bits_and_triton_elsewhere(
        monkeypatch):
    from spjax.model import sparse_attention

    monkeypatch.setattr(sparse_attention.jax, "default_backend", lambda: "gpu")
    hopper = {"value": True}
    monkeypatch.setattr(sparse_attention, "hopper_gpu", lambda: hopper["value"])
    resolve = sparse_attention.resolve_kernel
    assert resolve("auto", jnp.bfloat16, 128, 128) == "mosaic"
    assert resolve("auto", jnp.float16, 128, 64) == "mosaic"
    for dtype, block, head_dim in ((jnp.float32, 128, 128), (jnp.bfloat16, 64, 128),
                                   (jnp.bfloat16, 128, 32)):
        assert resolve("auto", dtype, block, head_dim) == "pallas", (dtype, block, head_dim)
    hopper["value"] = False
    assert resolve("auto", jnp.bfloat16, 128, 128) == "pallas"
    # the model's attention asks with its own q: dtype, block and head_dim reach the choice
    hopper["value"] = True
    seen = []
    monkeypatch.setattr(sparse_attention, "block_sparse_attention",
                        lambda q, k, v, tables, block, implementation, mosaic: seen.append(
                            (implementation, mosaic.fused_backward)) or q)
    section = _config("model.attention_pattern.block=128", "data.seq_len=256",
                      "model.attention_pattern.window=128",
                      rules='[[".*", sliding_window]]').model.attention_pattern
    q = jnp.zeros((1, 256, 2, 64), jnp.bfloat16)
    sparse_attention.attend(q, q, q, "sliding_window", section, "layers/0/attn")
    sparse_attention.attend(q.astype(jnp.float32), q, q, "sliding_window", section,
                            "layers/0/attn")
    # and the Mosaic backward's form from the config (fused by default)
    unfused = dataclasses.replace(section, fused_backward=False)
    sparse_attention.attend(q, q, q, "sliding_window", unfused, "layers/0/attn")
    assert seen == [("mosaic", True), ("pallas", True), ("mosaic", False)]


def test_sharded_kernels_equal_single_device():
    """Under a mesh the kernels run in shard_map: batch over data, heads over tensor."""
    config = _config("model.attention_pattern.window=32", "model.attention_pattern.kernel="
                     "interpret", "model.n_layers=1", "parallel.data=4", "parallel.tensor=2",
                     rules='[[".*", sliding_window]]')
    model = Transformer(config.model, nnx.Rngs(6))
    tokens = _tokens(7, (4, 64))
    assert_sharded_equals_single(model, tokens, config)


def test_attention_flops_follow_the_patterns():
    config = _config("model.attention_pattern.window=16",
                     rules='[["layers/0/attn", sliding_window], [".*", dense]]')
    densities = flops.attention_densities(config.model, 64)
    # block 16, 4 blocks, only the diagonal tiles: 4 x 16 x 17 / 2 of 64 x 65 / 2 pairs
    assert densities["layers/0/attn"] == pytest.approx(4 * 16 * 17 / (64 * 65))
    assert [densities[f"layers/{i}/attn"] for i in (1, 2, 3)] == [1.0, 1.0, 1.0]
    computed, dense = flops.attention_flops_per_token(config.model, 64)
    per_layer = 6 * config.model.d_model * 64
    assert dense == 4 * per_layer == flops.train_flops_per_token(config.model, 64) \
        - 6 * flops.matmul_params(config.model)
    assert computed == pytest.approx(per_layer * (3 + densities["layers/0/attn"]))


@pytest.mark.parametrize("overrides, needle", [
    (['model.attention_pattern.rules=[[".*", ring]]'], "pattern must be one of"),
    (['model.attention_pattern.rules=[[".*", sliding_window]]',
      "model.attention_pattern.window=128"], "larger than the sequence"),
    (['model.attention_pattern.rules=[["layers/0/attn", dense]]'], "no rule"),
    (["model.attention_pattern.block=24"], "power of two"),
    (['model.attention_pattern.rules=[[".*", file]]',
      "model.attention_pattern.path=/nonexistent.npy"], "does not exist"),
])
def test_bad_patterns_are_config_errors(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        _config(*overrides)


def test_a_sequence_the_block_does_not_divide_names_the_layer():
    config = _config("model.attention_pattern.window=16", rules='[[".*", sliding_window]]')
    model = Transformer(config.model, nnx.Rngs(0))
    with pytest.raises(ConfigError, match="layer 'layers/0/attn' at sequence length 40"):
        model(_tokens(0, (1, 40)))


def test_training_flops_count_the_attention_the_pattern_computes():
    """The accounting's train FLOPs follow the attention pattern; 'vs dense' compares with
    dense weights and dense causal attention."""
    from spjax.train import accounting as flops_lib
    from spjax.train.state import Program

    sizes = ["model=tiny", "model.n_layers=2", "model.vocab_size=64", "data.seq_len=256",
             "model.attention_pattern.block=32"]
    window_config = load_config(None, [
        *sizes, 'model.attention_pattern.rules=[["layers/0/.*", sliding_window], [".*", dense]]',
        "model.attention_pattern.window=64"])
    dense = Program.build(load_config(None, sizes)).accounting
    window = Program.build(window_config).accounting
    computed, full = flops_lib.attention_flops_per_token(window_config.model, 256)
    assert computed < full == dense.dense_attention_flops_per_token
    assert window.dense_flops_per_token == dense.dense_flops_per_token  # the same baseline
    saved = float(dense.measure(None)["flops_per_token"] - window.measure(None)["flops_per_token"])
    assert saved > 0 and saved == pytest.approx(full - computed, rel=1e-6)
