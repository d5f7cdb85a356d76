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
