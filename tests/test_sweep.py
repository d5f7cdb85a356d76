"""Sweeps: spec parsing and expansion, runners (local and a real SLURM), collect, fit, plots.

The runner's bookkeeping (parallelism, failures, retries, refusing a changed spec) is tested
with a stand-in for `spjax train` that only writes a summary, so it takes seconds; the real
thing runs in the end-to-end test (the 4-point `tiny_cpu` sweep) and under SLURM.
"""

import csv
import json
import shutil
import sys
import time
from pathlib import Path

import pytest
import yaml

from spjax.cli import main
from spjax.config import CONFIGS_DIR
from spjax.sweep import runners
from spjax.sweep.spec import load_spec, override

TINY = str(CONFIGS_DIR / "tiny.yaml")
ONE_DEVICE = "--xla_force_host_platform_device_count=1"  # one point, one CPU device: faster


def _spec(tmp_path: Path, body: dict, name: str = "spec.yaml") -> Path:
    body = {"base": TINY, "out": str(tmp_path / "runs"), **body}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


# ----------------------------------------------------------------------------- specs


def test_grid_times_zip_expands_in_order_with_names_from_values(tmp_path):
    spec = load_spec(_spec(tmp_path, {
        "overrides": {"model.vocab_size": 0, "train.eval_every": 0},
        "grid": {"model": ["tiny", "60m"], "train.steps": [10, 20]},
        "zip": [{"model.d_ff": [96, 160, 256], "optimizer.lr": [3e-3, 1e-3, 5e-4]}],
    }))
    points = spec.points()
    assert len(points) == 2 * 2 * 3
    assert spec.axis_keys == ["model", "train.steps", "model.d_ff", "optimizer.lr"]
    assert points[0].name == "model=tiny,train.steps=10,model.d_ff=96,optimizer.lr=0.003"
    assert points[-1].name == "model=60m,train.steps=20,model.d_ff=256,optimizer.lr=0.0005"
    assert points[5].run_dir == tmp_path / "runs" / points[5].name
    assert len({p.name for p in points}) == len(points)
    # Whole-section values first: the swept `model: 60m` preset does not wipe the common
    # `model.vocab_size: 0`, and the swept d_ff lands on top of the preset.
    p = next(p for p in points if dict(p.values)["model"] == "60m")
    assert p.overrides[0] == "model=60m"
    config = spec.point_config(p)
    assert (config.model.name, config.model.d_model, config.model.vocab_size) == ("60m", 512, 0)
    assert config.model.d_ff == dict(p.values)["model.d_ff"]
    assert config.run_dir == str(p.run_dir) and config.train.progress is False


def test_a_spec_without_axes_is_one_point_and_paths_resolve_from_the_spec(tmp_path):
    sub = tmp_path / "sweeps"
    sub.mkdir()
    shutil.copy(TINY, tmp_path / "base.yaml")
    (sub / "one.yaml").write_text("base: ../base.yaml\n")
    spec = load_spec(sub / "one.yaml")
    [point] = spec.points()
    assert point.name == "base" and spec.base == (tmp_path / "base.yaml").resolve()
    assert spec.out == Path("runs/sweeps/one").absolute()


@pytest.mark.parametrize("value", ["60m", "", "1e-3", "123", 0.5, 1e-5, True, None, [1, 2],
                                   {"a": "b c"}, "with space", "a=b"])
def test_overrides_parse_back_to_the_same_value(value):
    key, _, text = override("x.y", value).partition("=")
    assert key == "x.y" and (yaml.safe_load(text) if text.strip() else "") == value


@pytest.mark.parametrize("body, needle", [
    ({"grid": {"train.steps": [1]}, "bogus": 1}, "unknown key 'bogus'"),
    ({"base": None}, "base config 'None' not found"),
    ({"base": "nope.yaml"}, "relative to the spec file"),
    ({"grid": {"train.steps": []}}, "'grid.train.steps' must be a non-empty list"),
    ({"grid": {"train.steps": 5}}, "'grid.train.steps' must be a non-empty list"),
    ({"grid": ["train.steps"]}, "'grid' must be a mapping"),
    ({"zip": {"model.d_model": [32, 64], "model.d_ff": [96]}}, "equal lengths"),
    ({"overrides": {"train.steps": 3}, "grid": {"train.steps": [1, 2]}},
     "'train.steps' appears in both 'overrides' and 'grid'"),
    ({"grid": {"run_dir": ["a", "b"]}}, "must not set run_dir"),
    ({"grid": {"train.stepz": [1, 2]}}, "unknown config key 'train.stepz'"),
    ({"grid": {"model.n_heads": [3]}}, "point 'model.n_heads=3'"),
    ({"overrides": ["train.steps"]}, "must look like key=value"),
    ({"slurm": {"gpus": 1}}, "unknown key 'slurm.gpus'"),
    ({"slurm": {"gpus_per_node": "two"}}, "'slurm.gpus_per_node' must be an integer"),
    ({"grid": {"data.path": ["a/b", "a_b"]}}, "get the same run dir name"),
])
def test_bad_specs_are_one_line_errors_before_anything_runs(tmp_path, capsys, body, needle):
    code = main(["sweep", str(_spec(tmp_path, body)), "--dry-run"])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("spjax: error: "), err
    assert needle in lines[0], lines[0]
    assert not (tmp_path / "runs").exists()


def test_sweep_command_line_errors(tmp_path, capsys):
    assert main(["sweep", "collect"]) == 2
    assert "needs the spec" in capsys.readouterr().err
    assert main(["sweep", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    spec = _spec(tmp_path, {"grid": {"train.steps": [1]}})
    assert main(["sweep", str(spec), "--parallel", "0"]) == 2
    assert "--parallel must be >= 1" in capsys.readouterr().err


# ----------------------------------------------------------------------------- runner


# Stand-in for `spjax train RUN_DIR ...`: records when it ran, then fails (exit 2 with a
# one-line error, as spjax does) if its steps are listed in FAKE_FAIL_STEPS, else writes a
# finished summary.
FAKE_TRAIN = r"""
import json, os, signal, sys, time
run_dir, steps = sys.argv[1], int(sys.argv[2])

def stop(signum, frame):  # as spjax train: save, then exit with 128 + the signal
    open(os.path.join(run_dir, "stopped"), "w").write(str(signum))
    sys.exit(128 + signum)

signal.signal(signal.SIGTERM, stop)
open(os.path.join(run_dir, "started"), "w").close()
start = time.time(); time.sleep(float(os.environ.get("FAKE_SECONDS", "1")))
with open(os.path.join(os.path.dirname(run_dir), "times.jsonl"), "a") as f:
    f.write(json.dumps([start, time.time()]) + "\n")
if str(steps) in os.environ.get("FAKE_FAIL_STEPS", "").split(","):
    print("spjax: error: data.path '/nowhere' does not exist", file=sys.stderr)
    sys.exit(2)
print("training", run_dir)
with open(os.path.join(run_dir, "summary.json"), "w") as f:
    json.dump({"steps": steps, "params": 1000 * steps, "avg_nonzero_params": 500.0 * steps,
               "tokens_seen": 512 * steps, "train_flops": 1e9 * steps,
               "final_val_loss": 3.0 - steps / 100, "wall_time_s": 1.0}, f)
"""


@pytest.fixture
def fake_train(monkeypatch):
    def command(spec, point):
        steps = spec.point_config(point).train.steps
        return [sys.executable, "-c", FAKE_TRAIN, str(point.run_dir), str(steps)]

    monkeypatch.setattr(runners, "command", command)


def _attempts(log: Path) -> int:
    return log.read_text().count("=== spjax sweep: attempt")


def test_a_failed_point_does_not_stop_the_others_and_is_retried(tmp_path, capsys, monkeypatch,
                                                                 fake_train):
    spec = _spec(tmp_path, {"grid": {"train.steps": [5, 6, 7, 8]}})
    runs = tmp_path / "runs"
    monkeypatch.setenv("FAKE_FAIL_STEPS", "6")
    code = main(["sweep", str(spec), "--parallel", "2"])
    out = capsys.readouterr().out
    assert code == 1, out
    failed_log = runs / "train.steps=6" / "sweep.log"
    assert "FAILED train.steps=6: exit 2: spjax: error: data.path '/nowhere'" in out
    assert f"log: {failed_log}" in out
    assert "3 trained, 0 already finished, 1 failed" in out
    for steps in (5, 7, 8):
        assert json.loads((runs / f"train.steps={steps}" / "summary.json").read_text())[
            "steps"] == steps
    # --parallel 2: two points overlapped in time, never three.
    spans = [json.loads(line) for line in (runs / "times.jsonl").read_text().splitlines()]
    overlap = max(sum(s <= t < e for s, e in spans) for t, _ in spans)
    assert overlap == 2
    # Fixed: the next run retries the failed point only.
    monkeypatch.delenv("FAKE_FAIL_STEPS")
    assert main(["sweep", str(spec)]) == 0
    out = capsys.readouterr().out
    assert "1 trained, 3 already finished, 0 failed" in out
    assert _attempts(failed_log) == 2
    assert all(_attempts(runs / f"train.steps={s}" / "sweep.log") == 1 for s in (5, 7, 8))
    # Collect: one row per finished point, swept values first.
    assert main(["sweep", "collect", str(spec)]) == 0
    rows = list(csv.DictReader((runs / "runs.csv").open()))
    assert [r["train.steps"] for r in rows] == ["5", "6", "7", "8"]
    assert rows[0]["params"] == "5000" and rows[0]["avg_params"] == "2500.0"
    assert rows[0]["tokens"] == "2560" and rows[0]["loss"] == "2.95"
    assert rows[0]["sparsity_method"] == "none" and rows[0]["target_sparsity"] == "0.0"


def test_ctrl_c_stops_each_running_point_with_one_sigterm(tmp_path, capsys, monkeypatch,
                                                          fake_train):
    spec = _spec(tmp_path, {"grid": {"train.steps": [5, 6, 7]}})
    runs = tmp_path / "runs"
    monkeypatch.setenv("FAKE_SECONDS", "60")

    def tick(self, running):  # Ctrl-C once both running points are up
        if len(running) == 2 and all((p.point.run_dir / "started").exists() for p in running):
            raise KeyboardInterrupt

    monkeypatch.setattr(runners.Progress, "tick", tick)
    start = time.time()
    assert main(["sweep", str(spec), "--parallel", "2"]) == 130
    assert time.time() - start < 30  # did not wait out the 60 s points
    err = capsys.readouterr().err
    assert "points stopped with a checkpoint: train.steps=5, train.steps=6" in err
    for steps in (5, 6):  # SIGTERM (15), the signal spjax train saves a checkpoint on
        assert (runs / f"train.steps={steps}" / "stopped").read_text() == "15"
        assert not (runs / f"train.steps={steps}" / "summary.json").exists()
    assert not (runs / "train.steps=7" / "started").exists()


def test_a_changed_spec_is_refused_for_a_run_dir_it_does_not_match(tmp_path, capsys,
                                                                    fake_train):
    spec = _spec(tmp_path, {"overrides": {"optimizer.lr": 0.003},
                            "grid": {"train.steps": [5]}})
    assert main(["sweep", str(spec)]) == 0
    _spec(tmp_path, {"overrides": {"optimizer.lr": 0.001}, "grid": {"train.steps": [5]}})
    capsys.readouterr()
    assert main(["sweep", str(spec)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "was started with optimizer.lr=0.003 but the spec " \
        "now gives optimizer.lr=0.001; delete that run dir" in err, err


def test_collect_leaves_out_unfinished_points(tmp_path, capsys):
    spec = _spec(tmp_path, {"grid": {"train.steps": [5, 6]}})
    assert main(["sweep", "collect", str(spec), "--csv", str(tmp_path / "t.csv")]) == 0
    assert "2 points not finished" in capsys.readouterr().out
    assert list(csv.DictReader((tmp_path / "t.csv").open())) == []


# ----------------------------------------------------------------------------- end to end


def test_tiny_cpu_sweep_end_to_end_then_skip_and_resume(tmp_path, capsys, monkeypatch):
    """configs/sweeps/tiny_cpu.yaml: 4 real runs -> CSV -> fit -> plots; a re-run trains
    nothing; an interrupted point resumes from its last checkpoint."""
    monkeypatch.setenv("XLA_FLAGS", ONE_DEVICE)
    spec = str(CONFIGS_DIR / "sweeps" / "tiny_cpu.yaml")
    out = tmp_path / "sweep"
    code = main(["sweep", spec, "--out", str(out), "--parallel", "2"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "4 trained, 0 already finished, 0 failed" in printed

    assert main(["sweep", "collect", spec, "--out", str(out)]) == 0
    rows = list(csv.DictReader((out / "runs.csv").open()))
    assert len(rows) == 4
    assert list(rows[0])[:4] == ["run", "train.steps", "model.d_model", "model.d_ff"]
    for column in ("params", "avg_params", "tokens", "flops", "loss"):
        assert column in rows[0]
    for row in rows:
        assert int(row["tokens"]) == int(row["train.steps"]) * 8 * 64
        assert float(row["avg_params"]) == float(row["params"]) > 0  # dense
        assert float(row["flops"]) > 6 * float(row["params"]) * float(row["tokens"]) * 0.5
    loss = {(r["model.d_model"], r["train.steps"]): float(r["loss"]) for r in rows}
    for size in ("32", "64"):
        assert loss[(size, "30")] < loss[(size, "15")] < 6.0  # more tokens, lower loss

    fit_json = out / "fit.json"
    assert main(["fit", str(out / "runs.csv"), "--out", str(fit_json), "--bootstrap", "10",
                 "--starts", "8"]) == 0
    fit = json.loads(fit_json.read_text())
    assert {"E", "A", "B", "alpha", "beta", "confidence_intervals",
            "leave_largest_model_out"} <= set(fit)
    assert fit["points"] == 4 and fit["underdetermined"]
    assert "skipped" in fit["leave_largest_model_out"]  # 2 sizes: nothing left to fit
    assert fit["plots"] == [str(out / "fit_loss_vs_flops.png")]
    png = Path(fit["plots"][0]).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    # Re-run: every point is finished, so no process starts (nothing is appended to logs).
    capsys.readouterr()
    start = time.time()
    assert main(["sweep", spec, "--out", str(out), "--parallel", "2"]) == 0
    assert time.time() - start < 15
    assert "4 finished (skipped), 0 to resume, 0 to start" in capsys.readouterr().out
    logs = sorted(out.glob("*/sweep.log"))
    assert len(logs) == 4 and all(_attempts(log) == 1 for log in logs)

    # Interrupted point (no summary, last checkpoint at step 20 of 30): resumed, not redone.
    point = out / "train.steps=30,model.d_model=32,model.d_ff=96"
    (point / "summary.json").unlink()
    shutil.rmtree(point / "checkpoints" / "30")
    assert main(["sweep", spec, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "3 finished (skipped), 1 to resume, 0 to start" in printed
    assert "resuming from step 20" in printed
    log = (point / "sweep.log").read_text()
    assert _attempts(point / "sweep.log") == 2 and "resumed from step 20" in log
    assert json.loads((point / "summary.json").read_text())["steps"] == 30


# ----------------------------------------------------------------------------- real SLURM


def test_slurm_runner_runs_a_job_array_and_reports_a_failed_point(slurm, tmp_path, capsys,
                                                                  monkeypatch):
    monkeypatch.setenv("SLURM_CONF", slurm["SLURM_CONF"])
    monkeypatch.setenv("XLA_FLAGS", ONE_DEVICE)
    spec = _spec(tmp_path, {
        "overrides": {"model.d_model": 32, "model.d_ff": 96, "model.n_heads": 2,
                      "model.n_layers": 2, "data.seq_len": 64, "data.batch_size": 8,
                      "train.eval_every": 0, "train.eval_batches": 2},
        # Two real runs, and one that fails at start-up (its data does not exist).
        "zip": {"train.steps": [4, 6, 4], "data.path": ["", "", "/nonexistent/dataset"]},
    })
    runs = tmp_path / "runs"
    code = main(["sweep", str(spec), "--runner", "slurm"])
    printed = capsys.readouterr().out
    assert code == 1, printed
    assert "submitted job array" in printed and "(3 tasks)" in printed
    for steps in (4, 6):
        summary = json.loads((runs / f"train.steps={steps},data.path=" / "summary.json")
                             .read_text())
        assert summary["steps"] == steps
    bad = runs / "train.steps=4,data.path=_nonexistent_dataset"
    assert f"FAILED {bad.name}: no finished summary: spjax: error:" in printed
    assert f"log: {bad / 'sweep.log'}" in printed
    assert "/nonexistent/dataset" in (bad / "sweep.log").read_text()
    assert "slurm job" in (bad / "sweep.log").read_text()  # run by the array task
    [script] = (runs / "_slurm").glob("array-*.sh")
    assert "#SBATCH --array=0-2" in script.read_text()
    assert main(["sweep", "collect", str(spec)]) == 0
    assert len(list(csv.DictReader((runs / "runs.csv").open()))) == 2


def test_each_parallel_slot_gets_its_own_gpus(monkeypatch):
    from spjax.errors import SweepError
    from spjax.sweep.runners import slot_envs

    for key in ("CUDA_VISIBLE_DEVICES", "XLA_PYTHON_CLIENT_MEM_FRACTION",
                "XLA_PYTHON_CLIENT_PREALLOCATE"):
        monkeypatch.delenv(key, raising=False)
    owned = slot_envs(2, gpus=4)
    assert [e["CUDA_VISIBLE_DEVICES"] for e in owned] == ["0,1", "2,3"]
    assert all("XLA_PYTHON_CLIENT_MEM_FRACTION" not in e for e in owned)  # whole GPUs each
    shared = slot_envs(2)  # one GPU shared: memory split, no device assignment
    assert [e.get("XLA_PYTHON_CLIENT_MEM_FRACTION") for e in shared] == ["0.450", "0.450"]
    assert all("CUDA_VISIBLE_DEVICES" not in e for e in shared)
    packed = slot_envs(4, gpus=2)  # two small points per GPU: each GPU's memory halved
    assert [e["CUDA_VISIBLE_DEVICES"] for e in packed] == ["0", "1", "0", "1"]
    assert {e["XLA_PYTHON_CLIENT_MEM_FRACTION"] for e in packed} == {"0.450"}
    with pytest.raises(SweepError, match="one must be a multiple of the other"):
        slot_envs(2, gpus=3)
    with pytest.raises(SweepError, match="one must be a multiple of the other"):
        slot_envs(3, gpus=2)


@pytest.mark.parametrize("spec_path", sorted((CONFIGS_DIR / "sweeps").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_shipped_sweep_spec_builds_a_valid_config_for_each_point(spec_path):
    """A spec whose point names a key the config lacks, or a value it refuses, fails here
    rather than minutes into a GPU sweep."""
    spec = load_spec(spec_path)
    points = spec.points()
    assert len({p.name for p in points}) == len(points) >= 4
    for point in points:
        spec.point_config(point)  # raises a one-line ConfigError on a bad key or value
