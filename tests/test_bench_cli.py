"""The bench scripts' command lines: bad arguments are one-line errors before any GPU work."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.mark.parametrize("args, needle", [
    (["--presets", "foo"], "foo: model preset 'foo' not found"),
    (["--presets", "tiny", "--variants", "sparsity.kernel=bogus"],
     "tiny sparsity.kernel=bogus: config key 'sparsity.kernel' must be one of"),
    (["--presets", "tiny,60m", "--batch", "1,2,3"], "--batch: 3 values for 2 presets"),
])
def test_train_throughput_bad_arguments(args, needle):
    result = subprocess.run([sys.executable, str(BENCH / "train_throughput.py"), *args],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert needle in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("args, needle", [
    (["--seqs", "abc"], "--seqs, --blocks and --sparsities take comma-separated numbers"),
    (["--seqs", "100", "--blocks", "64"], "--blocks: 64 does not divide sequence length 100"),
])
def test_attention_bench_bad_arguments(args, needle):
    result = subprocess.run([sys.executable, str(BENCH / "attention.py"), *args],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert needle in result.stderr and "Traceback" not in result.stderr
