"""bench/plot_attention.py: the bench's JSON rows become one curve per sequence length, the
dense pattern's ratio at 0% sparsity; bad files get a one-line error."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import plot_attention  # noqa: E402


def _row(t, d, sparsity, dense, speedup, implementation="mosaic"):
    return {"T": t, "D": d, "implementation": implementation, "sparsity": sparsity,
            "dense_vs_cudnn_fb": dense, "speedup_fb": speedup}


def test_curves_put_the_dense_pattern_at_zero_sparsity_per_length_and_head_dim():
    rows = [_row(8192, 64, 0.9, 0.98, 5.7), _row(8192, 64, 0.5, 0.98, 1.8),
            _row(4096, 64, 0.899, 1.0, 4.2), _row(4096, 128, 0.9, 0.95, 4.3)]
    panels = plot_attention.curves(rows)
    assert list(panels) == [(64, "mosaic"), (128, "mosaic")]
    assert panels[(64, "mosaic")][8192] == [(0.0, 0.98), (0.5, 1.8), (0.9, 5.7)]
    assert panels[(64, "mosaic")][4096] == [(0.0, 1.0), (0.9, 4.2)]
    assert list(panels[(128, "mosaic")]) == [4096]


def test_plot_writes_a_png_and_bad_files_get_one_line_errors(tmp_path):
    good = tmp_path / "bench.json"
    good.write_text(json.dumps([_row(4096, 64, 0.0 + s, 0.97, 1 + 5 * s) for s in (0.5, 0.9)]))
    out = tmp_path / "plot.png"
    plot_attention.main([str(good), "--out", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"T": 4096, "D": 64}]))
    for args, expected in [([str(bad)], "lacks implementation"),
                           ([str(tmp_path / "none.json")], "not a bench/attention.py --json"),
                           ([str(good), "--implementations", "pallas"], "none in the files")]:
        run = subprocess.run([sys.executable, str(ROOT / "bench/plot_attention.py"), *args,
                              "--out", str(tmp_path / "x.png")], capture_output=True, text=True)
        assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
        assert expected in run.stderr and len(run.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("name", ["attention_h200_2026-12-01_d64.json",
                                  "attention_h200_2026-12-01_d128.json"])
def test_recorded_h200_results_load(name):
    """The JSON behind docs/BENCHMARKS.md's eighth attention run stays readable."""
    rows = plot_attention.load_rows([ROOT / "docs/data" / name])
    assert {r["T"] for r in rows} == {4096, 8192, 16384, 32768}
