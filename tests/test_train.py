"""Training: the loop's outputs, sharded == single-device, optimizer schedule.

Runs on 8 forced CPU devices (conftest). Checkpoint/resume tests live in test_resume.py.
"""

import json
import sysconfig
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from spjax import parallel
from spjax.cli import main
from spjax.config import CONFIGS_DIR, load_config
from spjax.errors import ConfigError
from spjax.data import prepare_dataset
from spjax.train.loop import train
from spjax.train.optimizer import build_optimizer, lr_schedule
from spjax.train.state import Program, init_state, state_layout
from spjax.train.step import make_train_step

STDLIB = Path(sysconfig.get_paths()["stdlib"])
SMALL_MODEL = ["model=tiny", "model.d_model=64", "model.d_ff=160", "model.n_heads=2",
               "model.n_layers=2"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "ds"
    inputs = [str(STDLIB / "json"), str(STDLIB / "email")]
    prepare_dataset(inputs, out, val_fraction=0.1, progress=False)
    return out


def _config(dataset: Path, run_dir: Path, *extra: str):
    return load_config(None, [*SMALL_MODEL, f"data.path={dataset}", f"run_dir={run_dir}",
                              "data.seq_len=64", "data.batch_size=8", "train.progress=false",
                              *extra])


def test_train_writes_metrics_tensorboard_and_summary(dataset, tmp_path):
    run_dir = tmp_path / "run"
    config = _config(dataset, run_dir, "train.steps=12", "train.log_every=4",
                     "train.eval_every=8", "train.eval_batches=2", "train.checkpoint_every=0")
    summary = train(config)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "loss" in r]
    assert [r["step"] for r in logged] == [4, 8, 12]
    for r in logged:
        assert {"loss", "lr", "grad_norm", "tokens_per_s"} <= r.keys()
        assert np.isfinite(r["loss"]) and r["tokens_per_s"] > 0 and r["grad_norm"] > 0
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [8, 12]
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    saved = json.loads((run_dir / "summary.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    for key in ("final_train_loss", "final_val_loss", "tokens_seen", "params", "train_flops",
                "wall_time_s"):
        assert saved[key] is not None, key
    assert saved["tokens_seen"] == 12 * 8 * 64
    assert saved["final_train_loss"] == logged[-1]["loss"]
    assert saved["final_val_loss"] == evals[-1]["val_loss"]
    assert logged[-1]["loss"] < logged[0]["loss"]  # it learns
    assert (run_dir / "config.yaml").exists()
    assert (run_dir / "checkpoints" / "12").is_dir()  # the final step is always saved


def test_lr_schedule_warmup_then_cosine_to_ten_percent():
    config = load_config(None, ["optimizer.lr=1e-3", "optimizer.warmup_steps=10"]).optimizer
    schedule = lr_schedule(config, total_steps=100)
    assert float(schedule(0)) == 0.0
    assert float(schedule(5)) == pytest.approx(5e-4)
    assert float(schedule(10)) == pytest.approx(1e-3)
    assert float(schedule(55)) == pytest.approx(1e-4 + 0.5 * 9e-4, rel=1e-3)
    assert float(schedule(100)) == pytest.approx(1e-4)
    default = load_config(None, []).optimizer
    assert float(lr_schedule(default, 1000)(100)) == pytest.approx(default.lr)  # 10% warm-up


def test_weight_decay_skips_norm_scales_and_clipping_bounds_the_update():
    config = load_config(None, ["optimizer.lr=0.1", "optimizer.warmup_steps=0",
                                "optimizer.grad_clip=1.0", "optimizer.weight_decay=0.5"])
    opt = build_optimizer(config.optimizer, 10)
    params = {"scale": np.ones(4, np.float32), "kernel": np.ones((2, 2), np.float32)}
    zero_grads = jax.tree.map(np.zeros_like, params)
    updates, _ = opt.update(zero_grads, opt.init(params), params)
    np.testing.assert_array_equal(updates["scale"], 0.0)  # no decay on vectors
    assert np.all(np.asarray(updates["kernel"]) < 0)  # decay on matrices
    clip = optax.clip_by_global_norm(1.0)
    huge = jax.tree.map(lambda p: 1e6 * np.ones_like(p), params)
    clipped, _ = clip.update(huge, clip.init(params))
    assert float(optax.tree.norm(clipped)) == pytest.approx(1.0, rel=1e-5)


def _run_steps(dataset: Path, data: int, fsdp: int, tensor: int, batches: list[dict],
               n_devices: int):
    config = load_config(None, [*SMALL_MODEL, "model.vocab_size=257", "train.steps=100",
                                "model.compute_dtype=float32", f"parallel.data={data}",
                                f"parallel.fsdp={fsdp}", f"parallel.tensor={tensor}",
                                # Adam's eps at 1e-6, not 1e-8: a weight whose gradient sums to
                                # ~1e-8 out of terms 1e4 times larger moves by lr g / (|g| +
                                # eps), and a sharded sum's reassociation error is the size of
                                # g there, so at 1e-8 the comparison below would measure that
                                # rounding (2e-6 on 1 of 10240 weights at tensor=4), not the
                                # sharding; at 1e-6 such weights barely move
                                "optimizer.warmup_steps=1", "optimizer.eps=1e-6"])
    mesh = parallel.make_mesh(config.parallel, jax.devices()[:n_devices])
    rules = parallel.sharding_rules(config.parallel)
    program = Program.build(config)
    layout = state_layout(program, mesh, rules)
    state = init_state(program, layout, seed=0)
    batch_sharding = parallel.batch_sharding(mesh, rules)
    with parallel.activate(mesh, rules):
        step = jax.jit(make_train_step(program),
                       in_shardings=(layout.state, batch_sharding),
                       out_shardings=(layout.state, None), donate_argnums=0)
        losses = []
        for batch in batches:
            state, metrics = step(state, parallel.host_to_global(batch, batch_sharding))
            losses.append(float(metrics["loss"]))
    return losses, state


@pytest.fixture(scope="module")
def single_device_run(dataset):
    """The reference of the mesh comparisons below, trained once: 4 batches, their losses and
    the final state on one device."""
    from spjax.data import train_iterator

    it = train_iterator(dataset, 64, 8, seed=0, process_index=0, process_count=1)
    batches = [next(it) for _ in range(4)]
    losses, state = _run_steps(dataset, 1, 1, 1, batches, 1)
    return batches, losses, state


@pytest.mark.parametrize("data, fsdp, tensor", [  # ~21 s each; every axis stays in the default
    pytest.param(1, 8, 1, marks=pytest.mark.slow), (2, 4, 1), (8, 1, 1),
    pytest.param(2, 2, 2, marks=pytest.mark.slow), (1, 2, 4)])
def test_sharded_training_equals_single_device_step_by_step(dataset, single_device_run, data,
                                                            fsdp, tensor):
    batches, single_losses, single = single_device_run
    losses, sharded = _run_steps(dataset, data, fsdp, tensor, batches, 8)

    kernel = sharded.params["layers"][0]["mlp"]["up"]["kernel"]
    mu = sharded.opt_state[1][0].mu["layers"][0]["mlp"]["up"]["kernel"]
    expected = P("fsdp" if fsdp > 1 else None, "tensor" if tensor > 1 else None)
    for array in (kernel, mu):  # the parameter and its Adam moment, sharded by the rules
        if fsdp > 1 or tensor > 1:
            assert array.sharding.spec == expected
        else:
            assert array.sharding.is_fully_replicated
    np.testing.assert_allclose(losses, single_losses, rtol=2e-6)
    assert single_losses[-1] < single_losses[0]
    for a, b in zip(jax.tree.leaves(single.params), jax.tree.leaves(sharded.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_batch_not_divisible_by_mesh_is_a_clear_error(dataset, tmp_path):
    with pytest.raises(ConfigError, match=r"data.batch_size \(6\) must be divisible by the 8"):
        train(_config(dataset, tmp_path / "r", "data.batch_size=6", "train.steps=1"))


def test_mesh_larger_than_devices_is_a_clear_error(dataset, tmp_path):
    with pytest.raises(ConfigError, match="must use all 8 devices"):
        train(_config(dataset, tmp_path / "r", "parallel.fsdp=16", "train.steps=1"))


def test_missing_dataset_is_one_line_cli_error(tmp_path, capsys):
    code = main(["train", str(CONFIGS_DIR / "tiny.yaml"), f"data.path={tmp_path / 'nope'}",
                 f"run_dir={tmp_path / 'r'}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("spjax: error: ") and "nope" in err and "prepare-data" in err


def test_compile_cache_fills_once_and_a_repeated_run_reuses_it(dataset, tmp_path):
    """train.compile_cache: the first run writes compiled programs; an identical run in
    another run dir loads them from the cache (hits, no new entries)."""
    from jax.experimental.compilation_cache import compilation_cache

    cache = tmp_path / "cache"
    min_time = jax.config.jax_persistent_cache_min_compile_time_secs
    max_size = jax.config.jax_compilation_cache_max_size
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # CPU compiles are fast
    try:
        extra = [f"train.compile_cache={cache}", "train.steps=2", "train.eval_every=0"]
        train(_config(dataset, tmp_path / "a", *extra))
        entries = sorted(p.name for p in cache.iterdir())
        assert entries, "nothing was cached"
        hits = []

        def count(event: str, **_) -> None:
            if event == "/jax/compilation_cache/cache_hits":
                hits.append(event)

        jax.monitoring.register_event_listener(count)
        try:
            train(_config(dataset, tmp_path / "b", *extra))
        finally:
            jax.monitoring.unregister_event_listener(count)
        assert len(hits) >= 1  # the train step came from the cache, not a new compile
        assert sorted(p.name for p in cache.iterdir()) == entries
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", min_time)
        jax.config.update("jax_compilation_cache_max_size", max_size)
        jax.config.update("jax_compilation_cache_dir", None)
        compilation_cache.reset_cache()


def test_an_unwritable_compile_cache_is_a_config_error(dataset, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError, match="train.compile_cache: cannot create"):
        train(_config(dataset, tmp_path / "run", f"train.compile_cache={blocker}/cache"))
