"""bench/trace_summary.py: the interval arithmetic behind 'exposed communication', on a
synthetic trace laid out as JAX's Perfetto export is (metadata events naming processes and
threads, complete 'X' events in microseconds)."""

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import trace_summary as ts  # noqa: E402


def _meta(kind, pid, tid, name):
    return {"ph": "M", "name": kind, "pid": pid, "tid": tid, "args": {"name": name}}


def _kernel(pid, tid, name, start, dur):
    return {"ph": "X", "pid": pid, "tid": tid, "name": name, "ts": start, "dur": dur}


def _trace():
    """GPU 0: compute [0, 10) and [12, 20) on one stream, an all-reduce [8, 14) on another
    -> comm 6, hidden 4 ([8, 10) and [12, 14)), exposed 2, busy [0, 20), no idle.
    GPU 1: compute [0, 5), nccl [10, 15) -> nothing hidden, idle [5, 10).
    A host thread's events and the module line must be ignored."""
    return {"traceEvents": [
        _meta("process_name", 1, 0, "/device:GPU:0"),
        _meta("thread_name", 1, 1, "Stream #13(compute)"),
        _meta("thread_name", 1, 2, "Stream #14(nccl)"),
        _meta("thread_name", 1, 3, "XLA Modules"),
        _meta("process_name", 2, 0, "/device:GPU:1"),
        _meta("thread_name", 2, 1, "Stream #13"),
        _meta("process_name", 9, 0, "/host:CPU"),
        _meta("thread_name", 9, 1, "python"),
        _kernel(1, 1, "fusion.3", 0, 10), _kernel(1, 1, "cutlass_gemm", 12, 8),
        _kernel(1, 2, "all-reduce-start.1", 8, 6),
        _kernel(1, 3, "jit_train_step", 0, 20),
        _kernel(2, 1, "fusion.3", 0, 5),
        _kernel(2, 1, "ncclDevKernel_AllReduce_Sum_bf16_RING_LL", 10, 5),
        _kernel(9, 1, "PjitFunction(train_step)", 0, 1000),
    ]}


def test_hidden_and_exposed_communication_per_device():
    devices = ts.kernels_by_device(_trace()["traceEvents"])
    assert sorted(devices) == ["/device:GPU:0", "/device:GPU:1"]
    gpu0 = ts.summarize(devices["/device:GPU:0"], steps=1)
    assert gpu0 == pytest.approx({"span_ms": 0.020, "compute_ms": 0.018, "comm_ms": 0.006,
                                  "hidden_ms": 0.004, "exposed_ms": 0.002, "idle_ms": 0.0})
    gpu1 = ts.summarize(devices["/device:GPU:1"], steps=1)
    assert gpu1["hidden_ms"] == 0 and gpu1["exposed_ms"] == pytest.approx(0.005)
    assert gpu1["idle_ms"] == pytest.approx(0.005)
    per_step = ts.summarize(devices["/device:GPU:0"], steps=2)
    assert per_step["exposed_ms"] == pytest.approx(0.001)


def test_idle_gaps_are_keyed_by_the_kernels_around_them():
    devices = ts.kernels_by_device(_trace()["traceEvents"])
    assert ts.idle_gaps(devices["/device:GPU:0"], steps=1) == {}  # always busy
    gaps = ts.idle_gaps(devices["/device:GPU:1"], steps=1)  # idle [5, 10)
    assert list(gaps) == [("fusion", "ncclDevKernel_AllReduce_Sum_bf")]
    assert gaps[("fusion", "ncclDevKernel_AllReduce_Sum_bf")] == pytest.approx([1, 0.005])


def test_kernel_time_by_group_first_match_wins_rest_is_other():
    gpu0 = ts.kernels_by_device(_trace()["traceEvents"])["/device:GPU:0"]
    groups = [ts.parse_group("gemm=gemm"), ts.parse_group("comm=all-reduce|gemm")]
    assert ts.group_times(gpu0, groups, steps=1) == pytest.approx(
        {"gemm": 0.008, "comm": 0.006, "other": 0.010})


def test_the_script_reads_a_profile_directory(tmp_path):
    run = tmp_path / "plugins" / "profile" / "2026_11_30"
    run.mkdir(parents=True)
    with gzip.open(run / "perfetto_trace.json.gz", "wt") as f:
        json.dump(_trace(), f)
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "trace_summary.py"),
                          str(tmp_path), "--steps", "1", "--group", "gemm=cutlass"],
                         capture_output=True, text=True, check=True).stdout
    assert "| /device:GPU:0 | 0.02 | 0.02 | 0.01 | 0.00 | 0.00 | 0.00 |" in out
    assert "| all-reduce-start.1 | 1 | 0.006 | comm |" in out
    assert "| gemm | 0.01 |" in out and "| other | 0.02 |" in out


def test_a_malformed_group_is_a_one_line_error(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "trace_summary.py"),
                             str(tmp_path), "--group", "gemm"], capture_output=True, text=True)
    assert result.returncode != 0 and "--group 'gemm': expected LABEL=REGEX" in result.stderr


def test_a_directory_without_a_trace_is_a_one_line_error(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "trace_summary.py"),
                             str(tmp_path)], capture_output=True, text=True)
    assert result.returncode != 0
    assert result.stderr.strip().startswith("trace_summary: no trace JSON under")
