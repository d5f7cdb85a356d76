"""A full disk, on small tmpfs mounts (root; skipped where mounting is not permitted).

A checkpoint save that fails for lack of space is a one-line error (exit 2) naming the
checkpoint directory and the fix; the previous checkpoint stays intact and is the latest, and
once there is space the same command resumes from it to the straight run's losses, bit for
bit. Metrics and TensorBoard writes on a full disk are the same kind of one-line error,
neither a traceback nor a hang.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from spjax.errors import OutputError
from spjax.train.metrics import MetricsWriter

ROOT = Path(__file__).resolve().parents[1]
STEPS, EVERY = 60, 20
CONFIG = ["configs/tiny.yaml", "model.d_model=64", "model.d_ff=160", "model.n_heads=2",
          "model.n_layers=1", "data.seq_len=64", "data.batch_size=8", f"train.steps={STEPS}",
          "train.log_every=1", "train.eval_every=0", "train.eval_batches=1",
          f"train.checkpoint_every={EVERY}", "train.keep_checkpoints=1", "train.progress=false"]
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1",
       "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}


@pytest.fixture
def tmpfs():
    """mount(directory, size_kib): a tmpfs of that size there (unmounted after the test);
    remount(directory, size_kib) resizes it."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("full-disk tests mount small tmpfs file systems: they need root and mount")
    mounted: list[Path] = []

    def mount(directory: Path, size_kib: int, remount: bool = False) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        options = f"remount,size={size_kib}k" if remount else f"size={size_kib}k"
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs",
                                 str(directory)], capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip()}); the full-disk "
                        f"tests need permission to mount")
        if not remount:
            mounted.append(directory)

    yield mount
    for directory in reversed(mounted):
        subprocess.run(["umount", "-l", str(directory)], capture_output=True)


def _train(run_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spjax.cli", "train", *CONFIG,
                           f"run_dir={run_dir}"], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=600)


def _losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def _kib(directory: Path) -> int:
    """Space the files under `directory` take, in KiB of 4 KiB pages (as tmpfs counts)."""
    return sum(-(-p.stat().st_size // 4096) * 4 for p in directory.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("straight")
    result = _train(run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def test_full_disk_at_a_save_is_one_line_and_the_run_resumes_once_there_is_space(
        straight, tmpfs, tmp_path):
    run_dir = tmp_path / "run"
    checkpoints = run_dir / "checkpoints"
    size = _kib(straight / "checkpoints" / str(STEPS))  # one checkpoint
    # Room for the step-20 checkpoint, not for step 40's beside it (keep_checkpoints=1 keeps
    # 20 until 40 is complete).
    tmpfs(checkpoints, size * 3 // 2)
    result = _train(run_dir)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-3000:]  # no traceback, no orbax log
    assert lines[0].startswith(f"spjax: error: checkpoint of step {2 * EVERY} could not be "
                               f"written to {checkpoints}: no space left")
    assert "free space there" in lines[0] and f"resumes from step {EVERY}" in lines[0]
    # The last good checkpoint is the only complete one; the failed save left only orbax's
    # temporary directory, which no reader takes for a checkpoint.
    assert sorted(p.name for p in checkpoints.iterdir() if p.name.isdigit()) == [str(EVERY)]
    assert all(".orbax-checkpoint-tmp" in p.name for p in checkpoints.iterdir()
               if not p.name.isdigit())
    assert max(_losses(run_dir)) > EVERY  # it trained on past the save that failed

    tmpfs(checkpoints, size * 4, remount=True)  # space freed
    result = _train(run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from step {EVERY}" in result.stdout
    assert _losses(run_dir) == _losses(straight)  # every step's loss, bit for bit
    assert json.loads((run_dir / "summary.json").read_text())["final_val_loss"] == \
        json.loads((straight / "summary.json").read_text())["final_val_loss"]
    assert sorted(p.name for p in checkpoints.iterdir()) == [str(STEPS)]  # temporaries gone


def test_metrics_on_a_full_disk_are_a_one_line_error_not_a_traceback_or_a_hang(
        tmpfs, tmp_path, capfd):
    run_dir = tmp_path / "run"
    tmpfs(run_dir, 64)
    writer = MetricsWriter(run_dir, 0)
    record = {f"metric_{i}": 0.1 * i for i in range(20)}
    with pytest.raises(OutputError) as failure:
        for step in range(1, 100_000):  # 64 KiB fill up within a few hundred steps
            writer.write(step, record)
    message = str(failure.value)
    assert message.startswith(f"cannot write {run_dir}/"), message
    assert "no space left" in message and "free space there" in message
    assert "resumes from the last checkpoint" in message
    writer.close()  # after a failure: nothing left to flush, no second error
    assert capfd.readouterr().err == ""  # no writer thread died with a traceback


def test_resuming_on_a_full_disk_keeps_metrics_jsonl_whole(tmpfs, tmp_path):
    """A resume rewrites metrics.jsonl without the records past its checkpoint; on a full
    disk that rewrite fails, and the file must still hold every record."""
    run_dir = tmp_path / "run"
    tmpfs(run_dir, 64)
    lines = "".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 400))
    (run_dir / "metrics.jsonl").write_text(lines)
    with (run_dir / "ballast").open("wb", buffering=0) as ballast:  # fill what is left
        with pytest.raises(OSError):
            while True:
                ballast.write(b"\0" * 4096)
    with pytest.raises(OutputError, match="no space left"):
        MetricsWriter(run_dir, resume_step=100)
    assert (run_dir / "metrics.jsonl").read_text() == lines
    assert sorted(p.name for p in run_dir.iterdir()) == ["ballast", "metrics.jsonl"]
