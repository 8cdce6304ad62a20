"""Timing calls side by side, for the in-process benchmarks (bench.step, bench.tree_cost)."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def medians_ms(calls: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """Median time of each call in ms, after one warm-up call each, the calls taking turns rep by
    rep (so that drift in the machine's speed falls on all of them alike)."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for call in calls.values():
        call()
    for _ in range(reps):
        for name, call in calls.items():
            started = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - started)
    return {name: round(statistics.median(t) * 1000, 2) for name, t in times.items()}
