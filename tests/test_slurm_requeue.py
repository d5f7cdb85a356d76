"""Pre-emption under a real SLURM (the `slurm` fixture, conftest.py): a job whose training
outlasts its time limit is warned before the limit (SIGUSR1 to the batch shell of
launch/spjax.sbatch), saves, requeues itself, and finishes across several allocations with
the losses of a straight run, bit for bit.

Nothing is killed by hand: the training is cut by `--time=1` (a minute, SLURM's smallest
limit) and `--signal=B:USR1@15`. slurmctld checks time limits every 30 s, so the warning comes
15-45 s after the start and the limit's kill at least 30 s after the warning; the training
takes longer than one such allocation on the 2-core test machine (a much faster machine
would finish in one and the test says so). The straight run trains meanwhile, beside it.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# About 45 s of training alone on 2 cores, more beside the straight run; one device, so the
# straight run and every allocation compute the same thing.
STEPS = 5000
CONFIG = ["configs/tiny.yaml", "model.d_model=64", "model.d_ff=160", "model.n_heads=2",
          "model.n_layers=1", "data.seq_len=64", "data.batch_size=8", f"train.steps={STEPS}",
          "train.log_every=10", "train.eval_every=0", "train.eval_batches=1",
          # no periodic saves: every resume starts from a save made on the warning
          "train.checkpoint_every=0", "train.progress=false"]
ENV = {"JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1",
       "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}


def _losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.mark.slow  # 1-1.5 min (2-3 allocations of up to 45 s, 7 s apart), 3 min under load
def test_time_limit_saves_requeues_and_resumes_to_the_straight_runs_losses(slurm, tmp_path):
    run_dir, straight_dir, log = tmp_path / "run", tmp_path / "straight", tmp_path / "job.out"
    exports = ",".join(["ALL", *(f"{k}={v}" for k, v in ENV.items()),
                        f"SPJAX_PYTHON={sys.executable}"])
    job = subprocess.Popen(["sbatch", "--wait", "--time=1", "--signal=B:USR1@15",
                            f"--export={exports}", f"--output={log}", "launch/spjax.sbatch",
                            *CONFIG, f"run_dir={run_dir}"], cwd=ROOT, env=slurm,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        straight = subprocess.run([sys.executable, "-m", "spjax.cli", "train", *CONFIG,
                                   f"run_dir={straight_dir}"], cwd=ROOT,
                                  env={**os.environ, **ENV}, capture_output=True, text=True,
                                  timeout=600)
        assert straight.returncode == 0, straight.stderr[-3000:]
        _, err = job.communicate(timeout=600)
    finally:
        if job.poll() is None:
            job.kill()
    output = log.read_text() if log.exists() else ""
    assert job.returncode == 0, f"{err}\n{output[-4000:]}"

    # Cut by the time limit, saved on the warning, requeued, resumed where it stopped.
    warned = output.count("time limit near (SIGUSR1)")
    assert warned >= 1, f"the run finished within one allocation; raise STEPS\n{output}"
    assert "allocation 2 (requeued 1 times)" in output
    assert output.count("requeuing job") == warned
    stopped = [int(s) for s in re.findall(r"interrupted by signal 15 at step (\d+)", output)]
    resumed = [int(s) for s in re.findall(r"resumed from step (\d+)", output)]
    assert stopped and resumed == stopped, output
    assert "training finished" in output and "not requeuing" not in output

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["resumed_from_step"] == stopped[-1]
    expected = _losses(straight_dir)
    assert sorted(expected) == list(range(10, STEPS + 1, 10))
    assert _losses(run_dir) == expected  # every logged loss, bit for bit
    straight_summary = json.loads((straight_dir / "summary.json").read_text())
    assert summary["final_val_loss"] == straight_summary["final_val_loss"]
