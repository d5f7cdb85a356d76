"""The bench scripts' command lines: bad arguments are one-line errors before any GPU work."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.mark.parametrize("script, args, needle", [
    ("train_throughput.py", ["--presets", "foo"], "foo: model preset 'foo' not found"),
    ("train_throughput.py", ["--presets", "tiny", "--variants", "sparsity.kernel=bogus"],
     "tiny sparsity.kernel=bogus: config key 'sparsity.kernel' must be one of"),
    ("train_throughput.py", ["--presets", "tiny,60m", "--batch", "1,2,3"],
     "--batch: 3 values for 2 presets"),
    ("attention.py", ["--seqs", "abc"],
     "--seqs, --blocks and --sparsities take comma-separated numbers"),
    ("attention.py", ["--seqs", "100", "--blocks", "64"],
     "--blocks: 64 does not divide sequence length 100"),
    ("block_sparse.py", ["--implementations", "triton"], "--implementations: unknown ['triton']"),
    ("block_sparse.py", ["--shapes", "128x64"], "--shapes: each shape is TxKxN"),
    ("block_sparse.py", ["--shapes", "128x64x64", "--blocks", "48"],
     "--blocks: 48 does not divide"),
])
def test_bad_arguments_are_one_line_errors(script, args, needle):
    result = subprocess.run([sys.executable, str(BENCH / script), *args],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert needle in result.stderr and "Traceback" not in result.stderr


def test_throughput_steps_are_dispatched_back_to_back_with_one_wait_per_window(monkeypatch):
    """bench/train_throughput.py times steps as the training loop runs them, through
    pallas_kernels.timing.median_seconds: after two warm-up calls, `calls` calls then one wait
    per sample (a wait after every call would add host dispatch time)."""
    import jax

    from pallas_kernels import timing

    calls, waits = [], []
    monkeypatch.setattr(jax, "block_until_ready", lambda x: waits.append(len(calls)) or x)
    seconds = timing.median_seconds(lambda: calls.append(1) or 0.0, calls=5, samples=3)
    assert len(calls) == 17 and waits == [1, 2, 7, 12, 17]
    assert seconds >= 0
    assert "median_seconds(one, calls=steps, samples=3)" in (BENCH / "train_throughput.py"
                                                             ).read_text()
