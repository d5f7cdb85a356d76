"""Multi-process training: 2 processes x 4 CPU devices reproduce 1 process x 8 devices.

Started through launch/local.py (our launcher, gloo collectives) and through a real
single-node SLURM (launch/slurm_local.sh: Debian slurm-wlm + munge on loopback) with
`sbatch launch/spjax.sbatch` (srun inside). The data rows, their split over processes, and
the reductions are the same in every layout, so losses agree to float32 rounding. A
checkpoint written by two processes resumes in one.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = 12
# One layer: the processes, their data rows and reductions are what is compared here.
CONFIG = ["configs/tiny.yaml", "model.d_model=64", "model.d_ff=160", "model.n_heads=2",
          "model.n_layers=1", "data.seq_len=64", "data.batch_size=16", f"train.steps={STEPS}",
          "train.log_every=1", "train.eval_every=6", "train.eval_batches=2",
          "train.checkpoint_every=4", "train.progress=false"]
CPU_ENV = {"JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}


def _env(devices: int) -> dict[str, str]:
    flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                     if not f.startswith("--xla_force_host_platform_device_count"))
    return {**os.environ, **CPU_ENV,
            "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={devices}".strip()}


def _run(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, f"{' '.join(command[:6])} failed:\n{result.stderr[-3000:]}"
    return result


def _metrics(run_dir: Path) -> dict[str, dict[int, float]]:
    """Last logged value per step (a resumed run re-logs the steps after its checkpoint)."""
    out: dict[str, dict[int, float]] = {"loss": {}, "val_loss": {}}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for key in out:
            if key in record:
                out[key][record["step"]] = record[key]
    return out


def _assert_same(got: dict[int, float], want: dict[int, float], steps) -> None:
    assert set(steps) <= set(got), f"missing steps {sorted(set(steps) - set(got))}"
    for step in steps:
        assert got[step] == pytest.approx(want[step], rel=2e-5), f"step {step}"


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict:
    run_dir = tmp_path_factory.mktemp("single")
    _run([sys.executable, "-m", "spjax.cli", "train", *CONFIG, f"run_dir={run_dir}"], _env(8))
    return _metrics(run_dir)


@pytest.fixture(scope="module")
def two_local(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("two_local")
    result = _run([sys.executable, "launch/local.py", "--nproc", "2", "--cpu",
                   "--devices-per-proc", "4", "--", "spjax", "train", *CONFIG,
                   f"run_dir={run_dir}"], {**os.environ, **CPU_ENV})
    assert "[1] " in result.stdout + result.stderr  # both ranks ran, output prefixed
    return run_dir


def test_two_processes_match_one_process(single, two_local):
    two = _metrics(two_local)
    _assert_same(two["loss"], single["loss"], range(1, STEPS + 1))
    _assert_same(two["val_loss"], single["val_loss"], [6, 12])
    summary = json.loads((two_local / "summary.json").read_text())
    assert summary["devices"] == 8


def test_checkpoint_of_two_processes_resumes_in_one(single, two_local, tmp_path):
    run_dir = tmp_path / "resumed"
    shutil.copytree(two_local, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / str(STEPS))  # back to the step-8 checkpoint
    result = _run([sys.executable, "-m", "spjax.cli", "train", *CONFIG, f"run_dir={run_dir}"],
                  _env(8))
    assert "resum" in (result.stdout + result.stderr).lower()
    _assert_same(_metrics(run_dir)["loss"], single["loss"], range(9, STEPS + 1))


def test_time_based_saves_are_agreed_by_both_processes(single, tmp_path):
    """train.checkpoint_every_minutes follows process 0's clock: both processes must save at
    the same steps (a save is collective) and the run must equal the single process's."""
    run_dir = tmp_path / "timed"
    _run([sys.executable, "launch/local.py", "--nproc", "2", "--cpu", "--devices-per-proc", "4",
          "--", "spjax", "train", *CONFIG, f"run_dir={run_dir}", "train.checkpoint_every=0",
          "train.checkpoint_every_minutes=1e-9", "train.keep_checkpoints=20"],
         {**os.environ, **CPU_ENV})
    saved = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == list(range(1, STEPS + 1))  # every step is past a ~0 s interval
    _assert_same(_metrics(run_dir)["loss"], single["loss"], range(1, STEPS + 1))


def test_launcher_reports_a_failed_process_and_its_code(tmp_path):
    result = subprocess.run([sys.executable, "launch/local.py", "--nproc", "2", "--cpu", "--",
                             "spjax", "train", *CONFIG, "model.n_heads=3",
                             f"run_dir={tmp_path}"], cwd=ROOT, env={**os.environ, **CPU_ENV},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "spjax: error:" in result.stderr and "n_heads" in result.stderr
    assert "Traceback" not in result.stderr


def test_half_set_launcher_environment_is_a_one_line_error(tmp_path):
    env = {**_env(1), "SPJAX_COORDINATOR": "127.0.0.1:1234"}
    result = subprocess.run([sys.executable, "-m", "spjax.cli", "train", *CONFIG,
                             f"run_dir={tmp_path}"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "SPJAX_NUM_PROCESSES" in lines[0], result.stderr


# ----------------------------------------------------------------------------- real SLURM
# The `slurm` fixture (a single-node cluster on loopback) lives in conftest.py.


def test_sbatch_two_tasks_match_one_process(slurm, single, tmp_path):
    run_dir = tmp_path / "run"
    log = tmp_path / "job.out"
    exports = ("ALL,JAX_PLATFORMS=cpu,PYTHONUNBUFFERED=1,"
               "XLA_FLAGS=--xla_force_host_platform_device_count=4,"
               f"SPJAX_PYTHON={sys.executable}")
    result = subprocess.run(["sbatch", "--wait", "--ntasks-per-node=2", f"--export={exports}",
                             f"--output={log}", "launch/spjax.sbatch", *CONFIG,
                             f"run_dir={run_dir}"], cwd=ROOT, env=slurm, capture_output=True,
                            text=True, timeout=600)
    output = log.read_text() if log.exists() else ""
    assert result.returncode == 0, f"{result.stderr}\n{output[-3000:]}"
    assert "2 task(s)" in output
    two = _metrics(run_dir)
    _assert_same(two["loss"], single["loss"], range(1, STEPS + 1))
    _assert_same(two["val_loss"], single["val_loss"], [6, 12])
