"""Checkpoint and resume, through the real CLI in subprocesses.

N steps straight must equal k steps, a hard kill (SIGKILL), a resume, a graceful stop (SIGTERM
saves and exits resumably) and a resume to N, loss for loss, bit for bit; a corrupt or
mismatched checkpoint is a clear one-line error, never a silent fresh start.
"""

import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from spjax.data import prepare_dataset

STDLIB = Path(sysconfig.get_paths()["stdlib"])
STEPS = 100
EVERY = 20


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "ds"
    prepare_dataset([str(STDLIB / "json"), str(STDLIB / "email")], out, val_fraction=0.1,
                    progress=False)
    return out


def _command(dataset: Path, run_dir: Path, *extra: str) -> list[str]:
    # One layer: what is tested here is the process (kill, signal, resume, data position);
    # multi-layer states restore bit-exactly in tests/test_lowrank.py and tests/test_moe.py.
    return [sys.executable, "-m", "spjax.cli", "train", "configs/tiny.yaml",
            f"run_dir={run_dir}", f"data.path={dataset}", "model.d_model=64", "model.d_ff=160",
            "model.n_heads=2", "model.n_layers=1", "data.seq_len=64", "data.batch_size=8",
            f"train.steps={STEPS}", "train.log_every=1", "train.eval_every=0",
            "train.eval_batches=1", f"train.checkpoint_every={EVERY}", "train.progress=false",
            *extra]


def _start(dataset: Path, run_dir: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(_command(dataset, run_dir, *extra), cwd=Path(__file__).parents[1],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _run(dataset: Path, run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(_command(dataset, run_dir, *extra), cwd=Path(__file__).parents[1],
                          capture_output=True, text=True, timeout=600)


def _losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def _committed_steps(run_dir: Path) -> list[int]:
    ckpt = run_dir / "checkpoints"
    return sorted(int(p.name) for p in ckpt.glob("*") if p.name.isdigit()) if ckpt.exists() else []


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, f"run ended early: {proc.communicate()[1][-2000:]}"
        assert time.time() < deadline, "timed out waiting"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def straight(dataset, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("straight")
    result = _run(dataset, run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def _logged_steps(run_dir: Path) -> list[int]:
    """Steps logged so far by a running process (a line it is writing is skipped)."""
    path = run_dir / "metrics.jsonl"
    steps = []
    for line in (path.read_text().splitlines() if path.exists() else []):
        try:
            steps.append(json.loads(line)["step"])
        except (json.JSONDecodeError, KeyError):
            continue
    return steps


def test_sigkill_then_sigterm_then_resume_equals_straight_run_exactly(dataset, straight,
                                                                      tmp_path):
    """One run dir, three processes: killed hard (SIGKILL) after its first checkpoint,
    resumed and stopped gracefully (SIGTERM: save where it stopped, exit 128 + 15), resumed
    to the end. Every step's loss equals the straight run's, bit for bit."""
    run_dir = tmp_path / "run"
    proc = _start(dataset, run_dir)
    _wait_for(lambda: _committed_steps(run_dir), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(_losses(run_dir))
    saved = _committed_steps(run_dir)
    assert proc.returncode == -signal.SIGKILL and saved and saved[-1] < STEPS
    assert killed_at < STEPS  # really stopped part-way

    # Resumed from the hard kill; stopped by SIGTERM once past the step the kill reached
    # (the steps beyond killed_at can only come from this process).
    proc = _start(dataset, run_dir)
    _wait_for(lambda: max(_logged_steps(run_dir), default=0) >= killed_at + 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert f"resumed from step {saved[-1]}" in out
    assert "run the same command again to resume" in err
    stopped = _committed_steps(run_dir)[-1]
    assert stopped == max(_losses(run_dir)) < STEPS  # saved exactly where it stopped
    assert stopped >= killed_at + 3

    result = _run(dataset, run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from step {stopped}" in result.stdout
    expected = _losses(straight)
    assert sorted(expected) == list(range(1, STEPS + 1))
    assert _losses(run_dir) == expected  # every step's loss, bit for bit
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from_step"] == stopped
    straight_summary = json.loads((straight / "summary.json").read_text())
    assert summary["final_val_loss"] == straight_summary["final_val_loss"]


def test_keeps_only_the_last_checkpoints(straight):
    assert _committed_steps(straight) == [STEPS - 2 * EVERY, STEPS - EVERY, STEPS]


def _copy_run(source: Path, dest: Path) -> Path:
    subprocess.run(["cp", "-r", str(source), str(dest)], check=True)
    return dest


def test_corrupt_checkpoint_is_a_clear_error_not_a_fresh_start(dataset, straight, tmp_path):
    run_dir = _copy_run(straight, tmp_path / "corrupt")
    for path in (run_dir / "checkpoints" / str(STEPS) / "state").rglob("*"):
        if path.is_file() and path.parent.name == "d":
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    result = _run(dataset, run_dir, f"train.steps={STEPS + 10}")
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("spjax: error: checkpoint") and "corrupt" in lines[-1]
    assert "Traceback" not in result.stderr
    assert max(_losses(run_dir)) == STEPS  # nothing was trained from scratch


def test_checkpoint_of_another_model_is_a_clear_error(dataset, straight, tmp_path):
    run_dir = _copy_run(straight, tmp_path / "other")
    result = _run(dataset, run_dir, "model.d_model=96", "model.n_heads=2")
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("spjax: error: checkpoint") and "model.d_model is 64 there but 96" \
        in last


@pytest.mark.slow  # ~110 s; tests/test_lowrank.py's resume test covers RigL masks in-process
def test_sparse_run_resumes_with_its_masks_exactly(dataset, tmp_path):
    """RigL moves masks every 7 steps; kill after a checkpoint, resume, compare to straight."""
    rigl = ("sparsity.method=rigl", "sparsity.sparsity=0.8", "sparsity.rigl.update_every=7")
    straight_dir = tmp_path / "straight"
    result = _run(dataset, straight_dir, *rigl)
    assert result.returncode == 0, result.stderr[-3000:]

    run_dir = tmp_path / "killed"
    proc = _start(dataset, run_dir, *rigl)
    _wait_for(lambda: _committed_steps(run_dir), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _committed_steps(run_dir)[-1] < STEPS
    result = _run(dataset, run_dir, *rigl)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _losses(run_dir) == _losses(straight_dir)
    a = json.loads((run_dir / "summary.json").read_text())
    b = json.loads((straight_dir / "summary.json").read_text())
    assert a["layer_density"] == b["layer_density"]
    assert a["avg_nonzero_params"] == b["avg_nonzero_params"]


def test_a_config_field_newer_than_the_checkpoint_is_accepted_only_at_its_default():
    from spjax.checkpoint import _check_meta
    from spjax.errors import CheckpointError

    found = {"format_version": 2, "model": {"d_model": 64}}
    defaults = {"model": {"d_model": 512, "n_kv_heads": 0}}
    at_default = {"format_version": 2, "model": {"d_model": 64, "n_kv_heads": 0}}
    _check_meta(found, at_default, Path("ckpt"), defaults)  # the new field changes nothing
    changed = {"format_version": 2, "model": {"d_model": 64, "n_kv_heads": 2}}
    with pytest.raises(CheckpointError, match="n_kv_heads"):
        _check_meta(found, changed, Path("ckpt"), defaults)
    with pytest.raises(CheckpointError, match="d_model"):  # existing keys still must match
        _check_meta(found, {"format_version": 2, "model": {"d_model": 32}}, Path("ckpt"),
                    defaults)
