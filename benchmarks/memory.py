"""Resident-memory measurement shared by the benchmarks (Linux: reads /proc/self/statm)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * 4096 / 2**20


def with_peak_rss(fn: Callable[[], T]) -> tuple[T, float, float, float]:
    """(result, seconds, peak RSS growth MB, retained RSS growth MB) of calling ``fn``.

    A sampling thread catches the peak, which transient buffers (decoding, autograd) set and a
    before/after difference would miss.
    """
    baseline, peak, running = rss_mb(), [0.0], [True]

    def sample() -> None:
        while running[0]:
            peak[0] = max(peak[0], rss_mb())
            time.sleep(0.005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start = time.perf_counter()
    try:
        result = fn()
    finally:
        seconds = time.perf_counter() - start
        running[0] = False
        thread.join()
    return result, seconds, max(peak[0], rss_mb()) - baseline, rss_mb() - baseline
