"""Long-run reliability: re-running a finished run, raising its step count, NaN/Inf steps
(stop or skip), the time-based checkpoint cadence and summary.json's time breakdown.

Training runs in-process on one CPU device at a toy size; the steps are the real loop's.
"""

import json
import sysconfig
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import TrainHarness
from spjax.cli import main
from spjax.config import load_config
from spjax.data import prepare_dataset
from spjax.train import step as step_module
from spjax.train.loop import NonFiniteError, train
from spjax.train.timing import PARTS

STDLIB = Path(sysconfig.get_paths()["stdlib"])
SMALL = ["model=tiny", "model.d_model=32", "model.d_ff=96", "model.n_heads=2",
         "model.n_layers=1", "data.seq_len=32", "data.batch_size=8", "train.progress=false",
         "train.eval_batches=1"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "ds"
    prepare_dataset([str(STDLIB / "json")], out, val_fraction=0.1, progress=False)
    return out


def _args(dataset: Path, run_dir: Path, *extra: str) -> list[str]:
    return [*SMALL, f"data.path={dataset}", f"run_dir={run_dir}", *extra]


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _steps_saved(run_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())


def _train_cli(dataset: Path, run_dir: Path, *extra: str) -> int:
    return main(["train", "configs/tiny.yaml", *_args(dataset, run_dir, *extra)])


# ----------------------------------------------------------------------------- re-runs


def test_rerun_of_a_finished_run_exits_0_and_changes_nothing(dataset, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert _train_cli(dataset, run_dir, "train.steps=6", "train.log_every=2") == 0
    summary = run_dir / "summary.json"
    before = (summary.read_bytes(), summary.stat().st_mtime_ns, _records(run_dir))
    capsys.readouterr()
    assert _train_cli(dataset, run_dir, "train.steps=6", "train.log_every=2") == 0
    out = capsys.readouterr()
    assert out.out.strip().splitlines() == [
        f"spjax: {run_dir} is already complete at step 6 (train.steps=6); summary.json is "
        f"unchanged. Raise train.steps to train further."]
    assert "Traceback" not in out.err
    assert (summary.read_bytes(), summary.stat().st_mtime_ns, _records(run_dir)) == before


def test_raising_steps_continues_and_says_what_happens_to_the_schedule(dataset, tmp_path,
                                                                       capsys):
    run_dir = tmp_path / "run"
    assert _train_cli(dataset, run_dir, "train.steps=6", "train.log_every=1") == 0
    capsys.readouterr()
    assert _train_cli(dataset, run_dir, "train.steps=10", "train.log_every=1") == 0
    out = capsys.readouterr().out
    assert "resumed from step 6" in out
    assert "train.steps changed from 6 to 10: resuming at step 6 with the learning-rate " \
           "schedule recomputed for 10 steps" in out
    losses = {r["step"]: r["loss"] for r in _records(run_dir) if "loss" in r}
    assert sorted(losses) == list(range(1, 11))
    saved = json.loads((run_dir / "summary.json").read_text())
    assert saved["steps"] == 10 and saved["resumed_from_step"] == 6
    # the new schedule is the one a 10-step run has: warm-up 1 step, cosine to step 10
    lr = {r["step"]: r["lr"] for r in _records(run_dir) if "lr" in r}
    from spjax.train.optimizer import lr_schedule
    schedule = lr_schedule(load_config(None, []).optimizer, 10)
    assert lr[8] == pytest.approx(float(schedule(7)), rel=1e-6)


def test_lowering_steps_below_the_checkpoint_is_a_one_line_error(dataset, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert _train_cli(dataset, run_dir, "train.steps=4") == 0
    capsys.readouterr()
    assert _train_cli(dataset, run_dir, "train.steps=3") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "train.steps=3" in err and "step 4" in err and "new run_dir" in err


def test_finished_run_without_summary_writes_it_without_training(dataset, tmp_path, capsys):
    """Killed between its final save and the summary: the re-run evaluates and summarizes."""
    run_dir = tmp_path / "run"
    assert _train_cli(dataset, run_dir, "train.steps=4", "train.log_every=2") == 0
    first = json.loads((run_dir / "summary.json").read_text())
    (run_dir / "summary.json").unlink()
    capsys.readouterr()
    assert _train_cli(dataset, run_dir, "train.steps=4", "train.log_every=2") == 0
    assert "train loss n/a (no step ran)" in capsys.readouterr().out
    again = json.loads((run_dir / "summary.json").read_text())
    assert again["steps"] == 4 and again["final_train_loss"] is None
    assert again["final_val_loss"] == first["final_val_loss"]  # the same saved state


# ----------------------------------------------------------------------------- NaN / Inf


@pytest.fixture
def poison(monkeypatch):
    """poison(steps): the loss is NaN on those (1-based) steps, through the real step."""
    real = step_module.losses_and_aux

    def install(bad_steps: list[int]) -> None:
        bad = jnp.asarray(bad_steps, jnp.int32)

        def poisoned(model_def, params, structure, batch, step=None):
            ce, aux = real(model_def, params, structure, batch, step)
            if step is None:
                return ce, aux
            return jnp.where(jnp.isin(step + 1, bad), jnp.nan, ce), aux

        monkeypatch.setattr(step_module, "losses_and_aux", poisoned)

    return install


def test_nan_stops_the_run_naming_the_step_and_last_good_checkpoint(dataset, tmp_path, poison,
                                                                    capsys):
    poison([5])
    run_dir = tmp_path / "run"
    config = load_config(None, _args(dataset, run_dir, "train.steps=10",
                                     "train.checkpoint_every=2"))
    with pytest.raises(NonFiniteError) as error:
        train(config)
    message = str(error.value)
    assert "\n" not in message
    assert "step 5: non-finite loss nan" in message
    assert f"last good checkpoint is step 4 in {run_dir / 'checkpoints'}" in message
    assert "train.nan_policy=skip" in message
    assert _steps_saved(run_dir) == [2, 4]  # nothing at or after the poisoned step
    assert not (run_dir / "summary.json").exists()


def test_nan_policy_skip_drops_those_updates_and_counts_them(dataset, tmp_path, poison):
    poison([3, 7])
    run_dir = tmp_path / "run"
    config = load_config(None, _args(dataset, run_dir, "train.steps=10", "train.log_every=1",
                                     "train.nan_policy=skip", "train.checkpoint_every=0"))
    summary = train(config)
    records = _records(run_dir)
    skipped = [r["step"] for r in records if r.get("nonfinite")]
    assert skipped == [3, 7]
    assert summary["skipped_nonfinite_steps"] == 2 and summary["steps"] == 10
    finite = [r["loss"] for r in records if "loss" in r and not r.get("nonfinite")]
    assert all(np.isfinite(finite)) and np.isfinite(summary["final_val_loss"])


def test_a_nonfinite_step_leaves_the_state_exactly_as_it_was(dataset, poison):
    poison([2])
    harness = TrainHarness(load_config(None, _args(dataset, Path("unused"), "train.steps=4",
                                                   "model.vocab_size=256")))
    tokens = np.random.default_rng(0).integers(0, 200, (8, 33))
    harness.step(tokens)
    before = jax.tree.map(np.asarray, harness.state)
    metrics = harness.step(tokens)
    after = jax.tree.map(np.asarray, harness.state)
    assert bool(metrics["nonfinite"]) and not np.isfinite(float(metrics["loss"]))
    assert int(after.step) == int(before.step) + 1  # the batch is consumed
    for name in ("params", "structure", "opt_state", "accounting"):
        for a, b in zip(jax.tree.leaves(getattr(before, name)),
                        jax.tree.leaves(getattr(after, name))):
            np.testing.assert_array_equal(a, b, err_msg=name)
    harness.step(tokens)  # and training goes on from it
    assert np.isfinite(np.asarray(jax.tree.leaves(harness.state.params)[0])).all()


def test_too_many_nonfinite_steps_in_a_row_stop_a_skipping_run(dataset, tmp_path, poison):
    poison(list(range(4, 40)))
    run_dir = tmp_path / "run"
    config = load_config(None, _args(dataset, run_dir, "train.steps=20",
                                     "train.nan_policy=skip", "train.nan_skip_limit=3",
                                     "train.checkpoint_every=2"))
    with pytest.raises(NonFiniteError, match=r"steps 4-6: 3 non-finite steps in a row"):
        train(config)
    assert [r["step"] for r in _records(run_dir) if r.get("nonfinite")] == [4, 5, 6]
    assert max(_steps_saved(run_dir)) == 4


# ----------------------------------------------------------------------------- cadence, time


def test_time_based_checkpoint_cadence(dataset, tmp_path):
    run_dir = tmp_path / "run"
    config = load_config(None, _args(dataset, run_dir, "train.steps=8",
                                     "train.checkpoint_every=0", "train.keep_checkpoints=20",
                                     "train.checkpoint_every_minutes=1e-9"))
    train(config)
    assert _steps_saved(run_dir) == list(range(1, 9))  # every step is past a ~0 s interval
    off = tmp_path / "off"
    train(load_config(None, _args(dataset, off, "train.steps=8", "train.checkpoint_every=0",
                                  "train.keep_checkpoints=20")))
    assert _steps_saved(off) == [8]


def test_summary_breaks_the_wall_time_down(dataset, tmp_path):
    run_dir = tmp_path / "run"
    summary = train(load_config(None, _args(dataset, run_dir, "train.steps=6",
                                            "train.eval_every=3", "train.checkpoint_every=3")))
    time_s = summary["time_s"]
    assert set(time_s) == {*PARTS, "other", "total"}
    for part in ("startup", "compile", "train_steps", "eval", "checkpoint", "summary"):
        assert time_s[part] > 0, part
    assert time_s["restore"] == 0
    parts = sum(time_s[p] for p in (*PARTS, "other"))
    assert parts == pytest.approx(time_s["total"], abs=0.01)
    assert time_s["total"] == pytest.approx(summary["wall_time_s"], abs=0.01)
    resumed = train(load_config(None, _args(dataset, run_dir, "train.steps=9")))
    assert resumed["time_s"]["restore"] > 0


def test_deterministic_mode_sets_xla_flag_and_is_refused_on_gpus(monkeypatch):
    from spjax.errors import ConfigError
    from spjax.train import determinism

    determinism.check_backend(True, "cpu")  # CPU: deterministic anyway, nothing to refuse
    determinism.check_backend(False, "gpu")
    with pytest.raises(ConfigError, match="train.deterministic=true does not run on GPUs yet"):
        determinism.check_backend(True, "gpu")
    jax.devices()  # JAX is running in this process: the flag can no longer take effect
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    with pytest.raises(ConfigError, match="before JAX starts"):
        determinism.configure(True)
    monkeypatch.setenv("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 "
                                    f"{determinism.XLA_FLAG}")
    determinism.configure(True)  # already in effect: fine
    assert determinism.flag_set()


def test_deterministic_runs_on_cpu_equal_default_runs(dataset, tmp_path, monkeypatch):
    """On CPU the mode changes no value: same losses as a default run (and bit-exact resume
    is tested in test_resume.py). The flag is set as the CLI would before JAX starts."""
    from spjax.train import determinism

    monkeypatch.setenv("XLA_FLAGS", determinism.XLA_FLAG)
    runs = {}
    for flag in ("false", "true"):
        run_dir = tmp_path / flag
        train(load_config(None, _args(dataset, run_dir, "train.steps=4", "train.log_every=1",
                                      f"train.deterministic={flag}")))
        runs[flag] = [r["loss"] for r in _records(run_dir) if "loss" in r]
    assert runs["true"] == runs["false"]


def test_cli_turns_the_flag_on_before_jax_starts(dataset, tmp_path):
    """Through `spjax train` in a fresh process, the mode's XLA flag goes in before the
    backend starts (no 'already running' error), and the run completes."""
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    env = {k: v for k, v in __import__("os").environ.items() if k != "XLA_FLAGS"}
    code = ("import os, sys; from spjax.cli import main; rc = main(sys.argv[1:]); "
            "print('XLA_FLAGS=' + os.environ.get('XLA_FLAGS', '')); sys.exit(rc)")
    result = subprocess.run([sys.executable, "-c", code, "train", "configs/tiny.yaml",
                             *_args(dataset, run_dir, "train.steps=2",
                                    "train.deterministic=true")],
                            cwd=Path(__file__).parents[1], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--xla_gpu_exclude_nondeterministic_ops=true" in result.stdout
    assert (run_dir / "summary.json").exists()
