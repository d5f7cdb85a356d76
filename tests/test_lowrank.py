"""Low-rank methods inside the real train step: ReLoRA merges, refactorization, SST, GaLore,
memory accounting, bad input, and bit-exact resume for every structure."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spjax import parallel
from spjax.checkpoint import Checkpointer
from flax import nnx

from spjax.config import CONFIGS_DIR, load_config
from spjax.errors import ConfigError
from spjax.tree import get_path
from spjax.train.memory import memory_report
from spjax.train.state import Program, init_state, state_layout
from spjax.train.step import make_train_step, token_losses

MODEL = ["model=tiny", "model.d_model=64", "model.d_ff=128", "model.n_heads=2",
         "model.n_layers=2", "model.vocab_size=64", "model.compute_dtype=float32",
         "data.seq_len=32", "data.batch_size=8", "optimizer.warmup_steps=1",
         "optimizer.lr=1e-2", "parallel.data=1", "lowrank.rank=8"]


class Run:
    def __init__(self, *overrides: str, steps: int = 20, seed: int = 0):
        self.config = load_config(None, [*MODEL, f"train.steps={steps}", *overrides])
        self.program = Program.build(self.config)
        self.mesh = parallel.make_mesh(self.config.parallel, jax.devices()[:1])
        self.rules = parallel.sharding_rules(self.config.parallel)
        self.layout = state_layout(self.program, self.mesh, self.rules)
        self.state = init_state(self.program, self.layout, seed=0)
        with parallel.activate(self.mesh, self.rules):
            self._step = jax.jit(make_train_step(self.program))
        self.rng = np.random.default_rng(seed)

    def batch(self):
        tokens = self.rng.integers(0, 64, size=(8, 33), dtype=np.int32)
        return {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:])}

    def step(self, batch=None):
        before = self.state
        self.state, metrics = self._step(self.state, batch or self.batch())
        return before, metrics

    def logits(self, state, batch):
        return self.program.model_def.merge(state.params, state.structure)(batch["inputs"])

    def adam(self, state=None):
        return (state or self.state).opt_state[1][0]


def test_relora_merge_keeps_the_function_resets_factors_and_moments_and_rewarms():
    run = Run("lowrank.method=relora", "lowrank.relora.merge_every=4",
              "lowrank.relora.rewarm_steps=3", steps=12)
    engine = run.program.lowrank
    batch = run.batch()
    for _ in range(3):
        run.step()
    before = run.state
    # run the merge directly on the current state: same function before and after
    # (jitted, as inside the train step: a few compiles instead of ~90 op-by-op ones)
    params, structure, opt_state = jax.jit(engine._merge)(before.params, before.structure,
                                                          before.opt_state, jax.random.key(0))
    merged = before.__class__(before.step, params, structure, opt_state, before.rng,
                              before.accounting)
    logits = jax.jit(run.logits)
    np.testing.assert_allclose(logits(merged, batch), logits(before, batch), rtol=1e-5,
                               atol=1e-5)
    layer = engine.layers[0]
    np.testing.assert_array_equal(get_path(params, layer.path)["b"], 0.0)
    mu = get_path(opt_state[1][0].mu, layer.path)
    assert np.all(np.asarray(mu["a"]) == 0) and np.all(np.asarray(mu["b"]) == 0)
    assert not np.allclose(get_path(structure, layer.path)["w0"],
                           get_path(before.structure, layer.path)["w0"])
    # inside training: the step completing t = 4 merges, and the lr re-warms after it
    run.step()
    assert np.all(np.asarray(get_path(run.state.params, layer.path)["b"]) == 0)
    factors = [float(engine.lr_factor(jnp.int32(c))) for c in range(10)]
    assert factors == pytest.approx([1, 1, 1, 1, 1 / 3, 2 / 3, 1, 1, 1 / 3, 2 / 3])


def test_refactorization_keeps_the_function_and_balances_the_factors():
    run = Run("lowrank.method=lowrank", "lowrank.refactor.every=3", steps=10)
    batch = run.batch()
    for _ in range(2):
        run.step()
    before = run.state
    engine = run.program.lowrank
    params, structure, opt_state = engine._refactor(before.params, before.structure,
                                                    before.opt_state, jax.random.key(0))
    after = before.__class__(before.step, params, structure, opt_state, before.rng,
                             before.accounting)
    np.testing.assert_allclose(run.logits(after, batch), run.logits(before, batch), rtol=1e-4,
                               atol=1e-5)
    for layer in engine.layers:
        a, b = (np.asarray(get_path(params, layer.path)[k]) for k in ("a", "b"))
        np.testing.assert_allclose(a.T @ a, b @ b.T, rtol=1e-4, atol=1e-6)
        mu = get_path(opt_state[1][0].mu, layer.path)
        assert np.all(np.asarray(mu["a"]) == 0) and np.all(np.asarray(mu["b"]) == 0)


def test_sst_trains_all_singular_values_and_only_the_selected_vectors():
    run = Run("lowrank.method=sst", "lowrank.rank=4", "lowrank.sst.reorth_every=100")
    engine = run.program.lowrank
    run.step()  # the warm-up's first step has learning rate 0
    for _ in range(4):
        before, _ = run.step()
        for layer in engine.layers:
            old_p, new_p = get_path(before.params, layer.path), get_path(run.state.params,
                                                                         layer.path)
            selected = np.asarray(get_path(before.structure, layer.path)["selection"])
            assert selected.sum() == 4
            assert np.all(np.asarray(new_p["s"]) != np.asarray(old_p["s"]))  # every s moves
            u_old, u_new = np.asarray(old_p["u"]), np.asarray(new_p["u"])
            np.testing.assert_allclose(u_new[:, ~selected], u_old[:, ~selected], rtol=1e-5,
                                       atol=1e-6)
            assert not np.allclose(u_new[:, selected], u_old[:, selected])
            np.testing.assert_allclose(np.linalg.norm(u_new, axis=0), 1.0, rtol=1e-5)


def test_galore_state_is_projected_to_the_rank():
    run = Run("lowrank.method=galore", "lowrank.rank=8", "lowrank.galore.update_every=2")
    for _ in range(3):
        run.step()
    galore = run.state.opt_state[1][0]
    up = get_path(galore.mu, ("layers", 0, "mlp", "up"))["kernel"]  # (64, 128): m < n
    down = get_path(galore.mu, ("layers", 0, "mlp", "down"))["kernel"]  # (128, 64): m > n
    head = galore.mu["lm_head"]["kernel"]  # not a target: full Adam
    assert up.shape == (8, 128) and down.shape == (128, 8) and head.shape == (64, 64)
    proj = np.asarray(get_path(galore.projector, ("layers", 0, "mlp", "up"))["kernel"])
    np.testing.assert_allclose(proj.T @ proj, np.eye(8), atol=1e-5)


def test_sltrain_trainable_count_at_60m_matches_the_closed_form():
    config = load_config(None, ["model=60m", "lowrank.method=sltrain"])
    program = Program.build(config)
    mesh = parallel.make_mesh(config.parallel)
    layout = state_layout(program, mesh, parallel.sharding_rules(config.parallel))
    report = memory_report(program.model_def, layout.abstract)
    d, f, n, v, r, delta = 512, 1376, 8, 32000, 128, 0.03
    shapes = [(d, d)] * 4 + [(d, f), (d, f), (f, d)]
    per_layer = sum(r * (a + b) + int(delta * a * b) for a, b in shapes)
    expected = n * per_layer + 2 * v * d + (2 * n + 1) * d
    assert report["total"]["trainable_params"] == expected
    assert round(expected / 1e6, 2) == 43.53  # SLTrain Table 2 / our notes: 43.53M
    assert report["sltrain"]["layers"] == 7 * n
    # indices are structure (int32), never a dense S
    assert report["sltrain"]["structure_bytes"] == 4 * n * sum(int(delta * a * b)
                                                                for a, b in shapes)
    adam_bytes = 2 * 4 * report["sltrain"]["trainable_params"]
    assert report["sltrain"]["optimizer_bytes"] == adam_bytes


@pytest.mark.parametrize("overrides, needle", [
    (["lowrank.method=lowrank", "lowrank.rank=65"], "lowrank.rank"),
    (["lowrank.method=sltrain", "lowrank.density=1.5"], "lowrank.density"),
    (["lowrank.method=sltrain", "lowrank.density=0"], "lowrank.density"),
    (["lowrank.method=galore", "sparsity.method=static"], "cannot be combined"),
    (["lowrank.method=sst", "lowrank.refactor.every=10"], "refactor"),
    (["lowrank.method=lowrank", "sparsity.method=static"], "is both"),
])
def test_bad_low_rank_settings_fail_at_start_up(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        Program.build(load_config(None, [*MODEL, *overrides]))


def test_low_rank_and_sparse_layers_can_share_a_model():
    run = Run("lowrank.method=lowrank", "sparsity.method=static",
              'lowrank.rules=[[".*/attn/.*", "lowrank"], [".*", "dense"]]',
              'sparsity.rules=[[".*/mlp/.*", "sparse"], [".*", "dense"]]')
    run.step()
    up = get_path(run.state.structure, ("layers", 0, "mlp", "up"))
    q = get_path(run.state.params, ("layers", 0, "attn", "q"))
    assert "mask" in up and set(q) == {"a", "b"}


STRUCTURES = {
    "lowrank": ["lowrank.method=lowrank", "lowrank.refactor.every=3"],
    "sltrain": ["lowrank.method=sltrain"],
    "lost": ["lowrank.method=lost"],
    "sst": ["lowrank.method=sst", "lowrank.rank=4", "lowrank.sst.reorth_every=4"],
    "relora": ["lowrank.method=relora", "lowrank.relora.merge_every=3"],
    "galore": ["lowrank.method=galore", "lowrank.galore.update_every=3"],
    "rigl": ["sparsity.method=rigl", "sparsity.rigl.update_every=3"],
}


@pytest.mark.parametrize("name", sorted(STRUCTURES))
def test_resume_from_a_checkpoint_is_bit_exact(name, tmp_path, stdlib_dataset):
    """k steps, save (orbax, as the loop does), restore into a fresh state, continue: every
    array equals the uninterrupted run's, across merges, refactorizations and resamples."""
    from spjax.data import train_iterator

    run = Run(*STRUCTURES[name], steps=10)  # one compiled step serves both runs
    start = run.state
    batches = [run.batch() for _ in range(8)]
    for b in batches:
        run.step(b)
    straight = run.state

    run.state = start
    for b in batches[:4]:
        run.step(b)
    iterator = train_iterator(stdlib_dataset, 32, 8, seed=0, process_index=0, process_count=1)
    ckpt = Checkpointer(tmp_path / "ckpt", keep=2)
    ckpt.save(4, run.state, iterator, {"x": 1})
    ckpt.wait()
    run.state = ckpt.restore(4, run.layout.abstract, iterator, {"x": 1})
    ckpt.close()
    for b in batches[4:]:
        run.step(b)
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(run.state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.fixture(scope="module")
def stdlib_dataset(tmp_path_factory):
    import sysconfig
    from pathlib import Path

    from spjax.data import prepare_dataset

    out = tmp_path_factory.mktemp("data") / "ds"
    prepare_dataset([str(Path(sysconfig.get_paths()["stdlib"]) / "json")], out, progress=False)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(STRUCTURES))
def test_loss_falls_for_every_structure(name):
    run = Run(*STRUCTURES[name], steps=30)
    batch = run.batch()  # the same batch: a model that learns must fit it
    first = float(jnp.mean(token_losses(run.program.model_def, run.state.params,
                                        run.state.structure, batch)))
    for _ in range(8):
        run.step(batch)
    last = float(jnp.mean(token_losses(run.program.model_def, run.state.params,
                                       run.state.structure, batch)))
    assert last < first - 0.1


@pytest.mark.parametrize("preset", sorted(p.stem for p in (CONFIGS_DIR / "lowrank").glob("*.yaml")))
def test_every_low_rank_preset_builds(preset):
    config = load_config(None, ["model=60m", f"lowrank={preset}"])
    program = Program.build(config)
    structures = {type(m).__name__ for _, m in nnx.iter_graph(
        nnx.eval_shape(lambda: program.model_def.create(0)))}
    if config.lowrank.method == "galore":
        assert "DenseLinear" in structures and program.lowrank is None
    else:
        assert any(config.lowrank.method.lower() in name.lower() for name in structures)
