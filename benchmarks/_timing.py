"""Timing shared by the benchmarks: the median of repeated runs after two warm-ups."""

from __future__ import annotations

import statistics
import time

__all__ = ["median_seconds"]


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
