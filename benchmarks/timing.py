"""Shared timing helpers for the benchmark scripts (median wall time of a synchronized call)."""

import statistics
import time


def median_ms(fn, sync, iters: int, warmup: int) -> float:
    """Median milliseconds of ``sync(fn())`` over `iters` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        sync(fn())
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        sync(fn())
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def first_call_s(fn, sync) -> float:
    """Seconds of the first synchronized call of ``fn``: for a fresh ``jax.jit`` function, compile + run."""
    start = time.perf_counter()
    sync(fn())
    return time.perf_counter() - start
