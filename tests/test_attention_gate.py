"""The learned attention gate (spjax/model/attention_gate.py): scores, masks, the distillation
target against numpy, training the gate alone, the model path against the reference masked
attention, where gradients go, config errors, end-to-end training, and sparsifying a dense
run's checkpoint with every other weight frozen."""

import json
import sysconfig
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from pallas_kernels.block_sparse_attention import reference
from helpers import assert_sharded_equals_single
from spjax import parallel
from spjax.tree import flat_paths
from spjax.cli import main
from spjax.config import load_config
from spjax.data import prepare_dataset
from spjax.errors import ConfigError
from spjax.model import attention_gate as ag
from spjax.model.transformer import Transformer, closed_form_param_count
from spjax.train import accounting as flops

TINY = ["model=tiny", "model.vocab_size=61", "model.compute_dtype=float32",
        "model.attention_pattern.block=16", "data.seq_len=64"]
LEARNED = 'model.attention_pattern.rules=[[".*", learned]]'


def _config(*overrides):
    return load_config(None, [*TINY, *overrides])


def _qk(seed=0, b=2, t=64, h=4, g=2, d=8):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(b, t, h, d)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(b, t, g, d)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, t, g, d)), jnp.float32)
    return q, k, v


def _gate(h=4, g=2, d=8, d_gate=16, seed=0):
    config = _config("model.d_model=32", "model.n_heads=4", f"model.n_q_heads={h}",
                     f"model.n_kv_heads={g}", f"model.attention_pattern.gate.d_gate={d_gate}",
                     LEARNED)
    assert config.model.head_dim == d
    return ag.AttentionGate(config.model, nnx.Rngs(seed)), config.model


def test_gate_scores_have_block_shape_are_causal_and_normalized():
    gate, _ = _gate()
    q, k, _ = _qk()
    log_p = gate.log_probs(q, k, 16)
    assert log_p.shape == (2, 2, 4, 4)
    above = ~np.tril(np.ones((4, 4), bool))
    assert np.all(np.isneginf(np.asarray(log_p)[..., above]))
    np.testing.assert_allclose(jnp.exp(log_p).sum(-1), 1.0, rtol=1e-6)
    # keys of the last block change only the last row
    changed = gate.log_probs(q, k.at[:, 48:].add(3.0), 16)
    np.testing.assert_array_equal(changed[..., :3, :], log_p[..., :3, :])
    assert not np.allclose(changed[..., 3, :], log_p[..., 3, :])


@pytest.mark.parametrize("density, keep_first", [(0.25, False), (0.5, True), (1.0, False),
                                                 (0.01, True)])
def test_topk_mask_keeps_the_diagonal_and_k_blocks_per_row(density, keep_first):
    log_p = jax.nn.log_softmax(jnp.where(np.tril(np.ones((8, 8), bool)), jax.random.normal(
        jax.random.key(1), (3, 2, 8, 8)), -jnp.inf), axis=-1)
    mask = np.asarray(ag.block_mask(log_p, density=density, keep_first=keep_first))
    assert not np.any(mask & ~np.tril(np.ones((8, 8), bool)))  # causal
    assert np.all(np.diagonal(mask, axis1=-2, axis2=-1))  # diagonal, so no empty row
    if keep_first:
        assert np.all(mask[..., :, 0])
    counts = ag.topk_counts(8, density, keep_first)
    np.testing.assert_array_equal(mask.sum(-1), np.broadcast_to(counts, mask.shape[:-1]))
    expected = np.clip(np.ceil(density * np.arange(1, 9) - 1e-9), 1 + keep_first * (
        np.arange(8) > 0), np.arange(1, 9))
    np.testing.assert_array_equal(counts, expected)
    # the kept off-forced blocks are the most probable ones of their row
    forced = ag.forced_blocks(8, keep_first)
    p = np.where(np.tril(np.ones((8, 8), bool)) & ~forced, np.exp(np.asarray(log_p)), -1)
    kept_min = np.where(mask & ~forced, p, np.inf).min(-1)
    dropped_max = np.where(~mask & (p >= 0), p, -np.inf).max(-1)
    assert np.all(kept_min >= dropped_max)


def test_threshold_mask_keeps_probable_blocks_and_forced_ones():
    log_p = jax.nn.log_softmax(jnp.where(np.tril(np.ones((6, 6), bool)), jax.random.normal(
        jax.random.key(2), (2, 6, 6)) * 3, -jnp.inf), axis=-1)
    mask = np.asarray(ag.block_mask(log_p, density=1.0, threshold=0.2))
    p = np.exp(np.asarray(log_p))
    np.testing.assert_array_equal(mask, (p >= 0.2) | np.eye(6, dtype=bool))


def test_distillation_target_equals_numpy_max_pooled_attention():
    q, k, _ = _qk(3, b=1, t=32, h=4, g=2, d=8)
    block = 8
    target = np.asarray(ag.distill_target(q, k, block))
    qn, kn = np.asarray(q, np.float64), np.asarray(k, np.float64)
    n = 32 // block
    expected = np.zeros((1, 2, n, n))
    for h in range(4):
        g = h // 2  # query head h reads key/value head h // (H / G)
        s = qn[0, :, h] @ kn[0, :, g].T / np.sqrt(8)
        s[np.triu_indices(32, 1)] = -np.inf
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        pooled = p.reshape(n, block, n, block).max(axis=(1, 3))
        expected[0, g] = np.maximum(expected[0, g], pooled)
    expected /= expected.sum(-1, keepdims=True)
    np.testing.assert_allclose(target, expected, rtol=1e-5, atol=1e-7)


def test_a_row_stride_computes_exactly_those_rows_of_the_full_target():
    q, k, _ = _qk(5, b=2, t=64, h=4, g=2, d=8)
    rows = ag.target_rows(8, 3)
    np.testing.assert_array_equal(rows, [1, 4, 7])  # ends at the last (longest) row
    np.testing.assert_array_equal(ag.target_rows(8, 1), np.arange(8))
    full = np.asarray(ag.distill_target(q, k, 8))
    np.testing.assert_allclose(np.asarray(ag.distill_target(q, k, 8, rows=rows)),
                               full[:, :, rows], rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("t, h, g, block, stride", [
    (96, 4, 2, 16, 1),   # 6 blocks: the kernel's vector is padded to 8
    (128, 4, 1, 32, 1),  # MQA: one map from all four heads
    (128, 2, 2, 16, 3),  # every 3rd row, ending at the last
])
def test_fused_target_kernel_equals_the_xla_target(t, h, g, block, stride):
    """The Pallas kernel (interpret mode) against the jnp target, fresh random Q and K with
    a spread of scales so the maxima are not all on the diagonal."""
    q, k, _ = _qk(20 + t + stride, b=2, t=t, h=h, g=g, d=16)
    q = q * jnp.linspace(0.5, 3.0, t)[None, :, None, None]
    rows = ag.target_rows(t // block, stride)
    expected = np.asarray(ag.distill_target(q, k, block, rows=rows))
    fused = np.asarray(ag.distill_target(q, k, block, rows=rows, implementation="interpret"))
    np.testing.assert_allclose(fused, expected, rtol=2e-5, atol=1e-7)
    # causal: nothing right of the diagonal, and every row sums to 1
    assert np.all(fused[..., np.arange(t // block)[None, :] > rows[:, None]] == 0)
    np.testing.assert_allclose(fused.sum(-1), 1.0, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("block", [64, 128])
def test_gpu_fused_target_kernel_equals_the_xla_target(block):
    """bf16 Q and K at 2048 tokens, GQA 8/2, every 4th row: the Triton-lowered kernel."""
    q, k, _ = _qk(40 + block, b=2, t=2048, h=8, g=2, d=64)
    q, k = q.astype(jnp.bfloat16), k.astype(jnp.bfloat16)
    rows = ag.target_rows(2048 // block, 4)
    expected = np.asarray(ag.distill_target(q, k, block, rows=rows))
    fused = np.asarray(jax.jit(lambda q, k: ag.distill_target(
        q, k, block, rows=rows, implementation="pallas"))(q, k))
    np.testing.assert_allclose(fused, expected, rtol=1e-4, atol=1e-6)


def test_the_gate_alone_learns_to_match_the_target():
    gate, _ = _gate(seed=3)
    q, k, _ = _qk(4)
    target = ag.distill_target(q, k, 16)
    graphdef, params = nnx.split(gate, nnx.Param)
    optimizer = optax.adam(3e-2)
    opt_state = optimizer.init(params)

    def loss(p):
        return ag.distill_loss(target, nnx.merge(graphdef, p).log_probs(q, k, 16))

    @jax.jit
    def step(p, s):
        value, grads = jax.value_and_grad(loss)(p)
        updates, s = optimizer.update(grads, s)
        return optax.apply_updates(p, updates), s, value

    first = float(loss(params))
    for _ in range(40):
        params, opt_state, _ = step(params, opt_state)
    assert float(loss(params)) < 0.5 * first


def test_gated_attention_equals_the_reference_masked_attention():
    gate, model_config = _gate()
    q, k, v = _qk(5)
    section = model_config.attention_pattern
    out, aux = ag.gated_attention(gate, q, k, v, section, "layers/0/attn")
    mask = ag.block_mask(gate.log_probs(q, k, 16), density=section.gate.density)
    expected = reference.attention(q, k, v, jnp.repeat(mask, 2, axis=1), block=16)
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
    assert float(aux["attn_density"]) == pytest.approx(
        flops.nominal_gate_density(model_config, 64))
    assert 0 < float(aux["attn_gate_recall"]) <= 1 and float(aux["attn_gate_loss"]) > 0


def _tokens(seed=0, shape=(2, 64)):
    return jnp.asarray(np.random.default_rng(seed).integers(0, 61, size=shape))


def test_warm_up_is_dense_and_the_model_counts_gate_params():
    tokens = _tokens()
    config = _config(LEARNED, "model.attention_pattern.gate.dense_until=5")
    model = Transformer(config.model, nnx.Rngs(1))
    dense = Transformer(_config().model, nnx.Rngs(1))
    nnx.update(model, nnx.state(dense, nnx.Param))  # the same weights, gates aside
    _, params = nnx.split(model, nnx.Param)
    assert sum(x.size for x in jax.tree.leaves(params)) == closed_form_param_count(config.model)
    # jitted (the step traced, as in training): two compiles instead of ~130 op-by-op ones
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, t, step: nnx.merge(graphdef, s).forward(t, step))
    dense_graphdef, dense_state = nnx.split(dense)
    dense_logits = jax.jit(lambda s, t: nnx.merge(dense_graphdef, s)(t))(dense_state, tokens)
    logits, aux = forward(state, tokens, jnp.int32(4))
    np.testing.assert_allclose(logits, dense_logits, rtol=1e-5, atol=1e-5)
    assert float(aux["attn_density"]) == 1.0
    sparse, aux = forward(state, tokens, jnp.int32(5))
    assert float(aux["attn_density"]) < 0.5 and not np.allclose(sparse, logits, atol=1e-4)


def test_gradients_of_the_gate_loss_reach_only_the_gate():
    config = _config(LEARNED, "model.n_layers=2")
    model = Transformer(config.model, nnx.Rngs(2))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tokens = _tokens(1)

    def parts(p):
        logits, aux = nnx.merge(graphdef, p, rest).forward(tokens)
        return jnp.mean(logits ** 2), aux["attn_gate_loss"]

    # jitted: the gradients as op by op, one compile each instead of some 130 small ones
    gate_grads = flat_paths(jax.jit(jax.grad(lambda p: parts(p)[1]))(nnx.to_pure_dict(params)))
    lm_grads = flat_paths(jax.jit(jax.grad(lambda p: parts(p)[0]))(nnx.to_pure_dict(params)))
    for path, grad in gate_grads.items():
        is_gate = "/attn/gate/" in path
        assert is_gate == ag.is_gate_param(tuple(path.split("/")))
        assert bool(np.any(grad != 0)) == is_gate, path
        if is_gate:  # the mask selection is not differentiable: no LM gradient to the gate
            assert not np.any(lm_grads[path]), path


def test_pallas_interpret_with_a_traced_mask_matches_the_reference_path():
    tokens = _tokens(2)

    def loss_and_grads(kernel):
        config = _config(LEARNED, "model.n_layers=1", f"model.attention_pattern.kernel={kernel}")
        model = Transformer(config.model, nnx.Rngs(4))
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        loss = lambda p: jnp.mean(nnx.merge(graphdef, p, rest)(tokens) ** 2)  # noqa: E731
        return jax.jit(jax.value_and_grad(loss))(params)

    ref_loss, ref_grads = loss_and_grads("xla")
    loss, grads = loss_and_grads("interpret")
    assert abs(float(loss) - float(ref_loss)) < 1e-5 * abs(float(ref_loss))
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_sharded_gated_kernels_equal_single_device():
    """Per-sequence tables under a mesh: split with the batch inside shard_map."""
    config = _config(LEARNED, "model.n_layers=1", "model.attention_pattern.kernel=interpret",
                     "parallel.data=4", "parallel.tensor=2",
                     "model.attention_pattern.gate.target_row_stride=2",
                     "model.attention_pattern.gate.target_kernel=interpret")
    model = Transformer(config.model, nnx.Rngs(6))
    tokens = _tokens(7, (4, 64))
    assert_sharded_equals_single(model, tokens, config)


@pytest.mark.parametrize("overrides, needle", [
    (["model.attention_pattern.gate.density=0"], "gate.density must lie in"),
    (["model.attention_pattern.gate.density=1.5"], "gate.density must lie in"),
    (["model.attention_pattern.gate.d_gate=0"], "gate.d_gate must be > 0"),
    (["model.attention_pattern.gate.threshold=1"], "gate.threshold must lie in"),
    (["model.attention_pattern.gate.dense_until=-1"], "gate.dense_until"),
    (["model.attention_pattern.gate.target_row_stride=0"], "gate.target_row_stride"),
    (["model.attention_pattern.gate.target_kernel=triton"], "target_kernel"),
    (["data.seq_len=72"], "must divide data.seq_len"),
    (['model.attention_pattern.rules=[[".*", dense]]', "train.trainable=gate"],
     "no layer is 'learned'"),
    (["train.trainable=gate", "sparsity.method=static"], "cannot be combined"),
])
def test_bad_gate_settings_are_one_line_config_errors(overrides, needle):
    with pytest.raises(ConfigError, match=needle) as error:
        _config(LEARNED, *overrides)
    assert "\n" not in str(error.value)


def test_the_fused_target_kernel_on_a_cpu_backend_is_a_clear_error():
    with pytest.raises(ConfigError, match="target_kernel=pallas runs a GPU kernel.*cpu"):
        ag.target_implementation("pallas")
    assert ag.target_implementation("auto") == "xla"  # CPU: the jnp target


# ------------------------------------------------------------------ end to end, checkpoints

STDLIB = Path(sysconfig.get_paths()["stdlib"])
SMALL = ["model=tiny", "model.d_model=64", "model.d_ff=160", "model.n_heads=2",
         "model.n_layers=1", "model.attention_pattern.block=16", "data.seq_len=64",
         "data.batch_size=8", "train.progress=false", "train.eval_batches=1",
         "train.checkpoint_every=0", "train.log_every=2", "optimizer.warmup_steps=0"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "ds"
    prepare_dataset([str(STDLIB / "json")], out, val_fraction=0.1, progress=False)
    return out


def _records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


def _final_params(run_dir: Path, config) -> dict:
    from spjax.checkpoint import restore_matching
    from spjax.train.loop import resolve_config
    from spjax.train.state import Program, state_layout

    config, _ = resolve_config(config)
    program = Program.build(config)
    layout = state_layout(program, parallel.make_mesh(config.parallel),
                          parallel.sharding_rules(config.parallel))
    restored, missing, _ = restore_matching(run_dir, {"params": layout.abstract.params})
    assert not missing
    return {k: np.asarray(v) for k, v in restored.items()}


def test_spjax_train_with_a_learned_gate_logs_its_loss_and_density(dataset, tmp_path):
    gated = tmp_path / "gated"
    assert main(["train", *_cli_config(tmp_path), *SMALL, f"data.path={dataset}",
                 f"run_dir={gated}", "train.steps=10", LEARNED,
                 "model.attention_pattern.gate.dense_until=4"]) == 0
    records = _records(gated)
    assert [r["step"] for r in records] == [2, 4, 6, 8, 10]
    for r in records:
        assert np.isfinite(r["attn_gate_loss"]) and "attn_gate_recall" in r
    assert [r["attn_density"] for r in records[:2]] == [1.0, 1.0]  # dense warm-up
    assert all(r["attn_density"] < 0.6 for r in records[2:])
    assert records[-1]["attention_flops_per_token"] < records[0]["attention_flops_per_token"]
    summary = json.loads((gated / "summary.json").read_text())
    assert summary["attention_flops_vs_dense"] < 1.0


def test_sparsify_a_dense_checkpoint_training_only_the_gates(dataset, tmp_path, capsys):
    """A dense run, then gates added to its checkpoint and trained alone by distillation."""
    dense = tmp_path / "dense"
    assert main(["train", *_cli_config(tmp_path), *SMALL, f"data.path={dataset}",
                 f"run_dir={dense}", "train.steps=4"]) == 0
    sparsified = tmp_path / "sparsified"
    overrides = [*SMALL, f"data.path={dataset}", f"run_dir={sparsified}", "train.steps=12",
                 LEARNED, f"train.init_from={dense}", "train.trainable=gate",
                 "optimizer.lr=1e-2"]
    capsys.readouterr()
    assert main(["train", *_cli_config(tmp_path), *overrides]) == 0
    assert "freshly initialized: layers/0/attn/gate/k" in capsys.readouterr().out
    before = _final_params(dense, load_config(None, [*SMALL, f"data.path={dataset}"]))
    after = _final_params(sparsified, load_config(None, overrides))
    changed = [p for p in after if p in before and not np.array_equal(after[p], before[p])]
    assert changed == []  # every non-gate weight bit-exactly as trained
    gates = [p for p in after if "/attn/gate/" in p]
    assert len(gates) == 2 and all(p not in before for p in gates)
    losses = [r["attn_gate_loss"] for r in _records(sparsified)]
    assert losses[-1] < losses[0]


def _cli_config(tmp_path: Path) -> list[str]:
    path = tmp_path / "empty.yaml"
    path.write_text("{}\n")
    return [str(path)]
