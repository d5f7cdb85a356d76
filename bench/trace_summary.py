"""Where a profiled step's GPU time goes: compute, communication, and how much of the
communication compute hides, per device, from a trace written by `--profile DIR`
(bench/train_throughput.py, bench/scaling.py).

    python bench/trace_summary.py DIR [--steps 3] [--top 15]

Reads the Chrome/Perfetto trace JSON that `jax.profiler.trace(..., create_perfetto_trace=True)`
writes (perfetto_trace.json.gz, or <host>.trace.json.gz) and, for every GPU process in it,
takes the kernels on its stream lines. A kernel is communication when its name looks like a
collective (NCCL kernels, all-reduce, all-gather, reduce-scatter, all-to-all, send/recv),
compute otherwise. Per device it prints, in ms per step:
  span       first kernel start to last kernel end
  compute    union of compute kernels' intervals
  comm       union of communication kernels' intervals
  hidden     the part of comm during which some compute kernel also runs
  exposed    comm - hidden: communication the step waits for
  idle       span - union of all kernels: the GPU runs nothing (host, launch gaps)
and the kernels with the most total time. `--group LABEL=REGEX` (repeatable) adds the kernel
time per step of each named group of kernels (the first group whose regex matches a kernel's
name takes it; the rest is 'other'), e.g. the block-sparse kernels' share of a training step:
    --group "block-sparse=mosaic|pallas|block_sparse" --group "gemm=gemm|cublas|cutlass"
`--gaps N` prints where the GPU sits idle: the N (kernel before, kernel after) pairs
with the most idle time between them. `--list` prints the trace's process and thread names,
to check which lines were read.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
from collections import defaultdict
from pathlib import Path

COLLECTIVE = re.compile(r"nccl|all-?reduce|all-?gather|reduce-?scatter|all-?to-?all|"
                        r"collective-?permute|ragged|\bsend\b|\brecv\b", re.IGNORECASE)
DEVICE = re.compile(r"gpu|/device:", re.IGNORECASE)
KERNEL_LINE = re.compile(r"stream", re.IGNORECASE)  # CUDA stream lines hold the kernels
FALLBACK_LINE = re.compile(r"xla ops", re.IGNORECASE)

Interval = tuple[float, float]


def find_trace(path: Path) -> Path:
    if path.is_file():
        return path
    for pattern in ("**/perfetto_trace.json.gz", "**/*.trace.json.gz", "**/*.json.gz",
                    "**/*.json"):
        found = sorted(path.glob(pattern))
        if found:
            return found[-1]
    raise SystemExit(f"trace_summary: no trace JSON under {path}; profile with --profile DIR")


def load_events(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def union(intervals: list[Interval]) -> list[Interval]:
    merged: list[list[float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


def length(intervals: list[Interval]) -> float:
    return sum(b - a for a, b in intervals)


def intersection(a: list[Interval], b: list[Interval]) -> list[Interval]:
    """Of two sorted, disjoint interval lists."""
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        start, end = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if start < end:
            out.append((start, end))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def names(events: list[dict]) -> tuple[dict, dict]:
    processes, threads = {}, {}
    for e in events:
        if e.get("ph") != "M":
            continue
        if e.get("name") == "process_name":
            processes[e["pid"]] = e.get("args", {}).get("name", "")
        elif e.get("name") == "thread_name":
            threads[(e["pid"], e.get("tid"))] = e.get("args", {}).get("name", "")
    return processes, threads


def kernels_by_device(events: list[dict]) -> dict[str, list[dict]]:
    """Complete events ('X') on each GPU process's kernel lines: its stream lines, or its
    'XLA Ops' line when the trace has no stream lines for it."""
    processes, threads = names(events)
    devices = {pid: name for pid, name in processes.items() if DEVICE.search(name)}
    lines: dict[int, set] = {}
    for pid in devices:
        own = {tid: name for (p, tid), name in threads.items() if p == pid}
        pick = {tid for tid, name in own.items() if KERNEL_LINE.search(name)}
        lines[pid] = pick or {tid for tid, name in own.items() if FALLBACK_LINE.search(name)}
    out: dict[str, list[dict]] = defaultdict(list)
    for e in events:
        pid = e.get("pid")
        if e.get("ph") == "X" and pid in devices and e.get("tid") in lines[pid]:
            out[devices[pid]].append(e)
    return dict(out)


def summarize(kernels: list[dict], steps: int = 1) -> dict[str, float]:
    """ms per step; trace times are in microseconds."""
    comm, compute = [], []
    for e in kernels:
        interval = (float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0)))
        (comm if COLLECTIVE.search(e.get("name", "")) else compute).append(interval)
    comm_u, compute_u = union(comm), union(compute)
    everything = union(comm + compute)
    hidden = length(intersection(comm_u, compute_u))
    span = (everything[-1][1] - everything[0][0]) if everything else 0.0
    per_step = 1e-3 / steps
    return {"span_ms": span * per_step, "compute_ms": length(compute_u) * per_step,
            "comm_ms": length(comm_u) * per_step, "hidden_ms": hidden * per_step,
            "exposed_ms": (length(comm_u) - hidden) * per_step,
            "idle_ms": (span - length(everything)) * per_step}


def top_kernels(kernels: list[dict], n: int, steps: int) -> list[tuple[str, int, float, str]]:
    totals: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for e in kernels:
        totals[e.get("name", "")][0] += 1
        totals[e.get("name", "")][1] += float(e.get("dur", 0.0))
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][1])[:n]
    return [(name, int(count), total * 1e-3 / steps,
             "comm" if COLLECTIVE.search(name) else "compute")
            for name, (count, total) in ranked]


def idle_gaps(kernels: list[dict], steps: int) -> dict[tuple[str, str], list[float]]:
    """The GPU's idle gaps (no kernel on any line), keyed by (kernel before, kernel after):
    [count per step, ms per step]. Names are cut at their first digit run, so the numbered
    fusions of one kind share a key."""
    ordered = sorted((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0)),
                      _kind(e.get("name", ""))) for e in kernels)
    gaps: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0.0])
    busy_until, last = None, ""
    for start, end, name in ordered:
        if busy_until is not None and start > busy_until:
            gap = gaps[(last, name)]
            gap[0] += 1 / steps
            gap[1] += (start - busy_until) * 1e-3 / steps
        if busy_until is None or end >= busy_until:
            busy_until, last = end, name
    return dict(gaps)


def _kind(name: str) -> str:
    return re.split(r"[._]?\d", name, maxsplit=1)[0] or name


def group_times(kernels: list[dict], groups: list[tuple[str, re.Pattern]],
                steps: int) -> dict[str, float]:
    """Summed kernel time (ms per step) of each group; 'other' takes what no regex matches."""
    totals = {label: 0.0 for label, _ in groups} | {"other": 0.0}
    for e in kernels:
        name = e.get("name", "")
        label = next((label for label, regex in groups if regex.search(name)), "other")
        totals[label] += float(e.get("dur", 0.0)) * 1e-3 / steps
    return totals


def parse_group(text: str) -> tuple[str, re.Pattern]:
    label, sep, pattern = text.partition("=")
    if not sep or not label or not pattern:
        raise argparse.ArgumentTypeError(f"--group {text!r}: expected LABEL=REGEX")
    try:
        return label, re.compile(pattern, re.IGNORECASE)
    except re.error as e:
        raise argparse.ArgumentTypeError(f"--group {text!r}: bad regex ({e})") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", help="a --profile directory or a trace JSON file")
    parser.add_argument("--steps", type=int, default=3,
                        help="steps in the trace (bench/train_throughput.py traces 3)")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--list", action="store_true", help="print process and thread names")
    parser.add_argument("--gaps", type=int, default=0, metavar="N",
                        help="also print the N (kernel before, kernel after) pairs with the "
                        "most idle GPU time between them")
    parser.add_argument("--group", type=parse_group, action="append", default=[],
                        metavar="LABEL=REGEX", help="sum the kernel time of kernels whose name "
                        "matches REGEX under LABEL (repeatable)")
    args = parser.parse_args()
    trace = find_trace(Path(args.path))
    events = load_events(trace)
    print(f"trace: {trace}")
    if args.list:
        processes, threads = names(events)
        for (pid, tid), name in sorted(threads.items(), key=lambda kv: str(kv[0])):
            print(f"  {processes.get(pid, pid)} / {name}")
    devices = kernels_by_device(events)
    if not devices:
        raise SystemExit("trace_summary: no GPU kernel lines in this trace (--list shows what "
                         "it has)")
    print(f"\nms per step (over {args.steps} steps):\n")
    print("| device | span | compute | comm | hidden | exposed comm | idle |")
    print("|---|---|---|---|---|---|---|")
    for device, kernels in sorted(devices.items()):
        s = summarize(kernels, args.steps)
        print(f"| {device} | {s['span_ms']:.2f} | {s['compute_ms']:.2f} | {s['comm_ms']:.2f} | "
              f"{s['hidden_ms']:.2f} | {s['exposed_ms']:.2f} | {s['idle_ms']:.2f} |")
    device, kernels = sorted(devices.items())[0]
    if args.group:
        print(f"\nkernel time by group on {device} (ms per step):\n")
        print("| group | ms |")
        print("|---|---|")
        for label, ms in group_times(kernels, args.group, args.steps).items():
            print(f"| {label} | {ms:.2f} |")
    if args.gaps:
        print(f"\nidle gaps on {device}, by the kernels around them (per step):\n")
        print("| kernel before | kernel after | gaps | idle ms |")
        print("|---|---|---|---|")
        ranked = sorted(idle_gaps(kernels, args.steps).items(), key=lambda kv: -kv[1][1])
        for (before, after), (count, ms) in ranked[:args.gaps]:
            print(f"| {before[:60]} | {after[:60]} | {count:.0f} | {ms:.3f} |")
    print(f"\nkernels with the most time on {device} (ms per step):\n")
    print("| kernel | calls | ms | kind |")
    print("|---|---|---|---|")
    for name, count, ms, kind in top_kernels(kernels, args.top, args.steps):
        print(f"| {name[:90]} | {count} | {ms:.3f} | {kind} |")


if __name__ == "__main__":
    main()
