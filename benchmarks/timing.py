"""Shared measuring helpers for the benchmark scripts (run them from the repo root): wall time,
peak resident memory on Linux, and the machine's description for the results."""

from __future__ import annotations

import os
import platform
import threading
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


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class PeakMeter:
    """Peak RSS from now on: VmHWM after a reset, or sampled VmRSS where resets are refused."""

    def __init__(self) -> None:
        self.baseline_kb = _status_kb("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            self.method = "VmHWM"
        except OSError:
            self.method = "sampled VmRSS (1 ms)"
            self._peak = self.baseline_kb
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, _status_kb("VmRSS"))
            time.sleep(0.001)

    def peak_kb(self) -> int:
        if self.method == "VmHWM":
            return _status_kb("VmHWM")
        self._stop.set()
        self._thread.join()
        return max(self._peak, _status_kb("VmRSS"))


def machine() -> str:
    """The CPU model, core count, RAM and OS, as the benchmark tables record the machine."""
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            mem = f", {int(f.readline().split()[1]) / 2**20:.0f} GiB RAM"
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores{mem}, {platform.system()} {platform.release()}"
