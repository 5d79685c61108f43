"""Shared timing helper for the benchmark scripts (run them from the repo root)."""

from __future__ import annotations

import time
from collections.abc import Callable


def min_median_ms(fn: Callable[[], object], n: int = 100, warmup: int = 10) -> tuple[float, float]:
    """``fn``'s fastest and median wall time in ms over ``n`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[0] * 1e3, times[n // 2] * 1e3
