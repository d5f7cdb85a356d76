"""Timing for kernel benchmarks: back-to-back calls, so launch overhead does not count.

A sub-millisecond kernel timed one call at a time with block_until_ready measures the Python
dispatch and the host-device round trip as much as the kernel. Here each sample dispatches
`calls` invocations asynchronously and waits once; the median over samples is reported.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import jax


def median_seconds(fn: Callable[[], Any], calls: int = 10, samples: int = 5) -> float:
    """Median seconds per call of `fn` (already jitted; called with no arguments)."""
    jax.block_until_ready(fn())  # compile
    jax.block_until_ready(fn())
    times = []
    for _ in range(samples):
        start = time.perf_counter()
        out = [fn() for _ in range(calls)]
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times)
