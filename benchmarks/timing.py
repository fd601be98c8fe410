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


def interleaved(fns: dict, iters: int, warmup: int, block: int = 1) -> dict:
    """Time several synchronized calls in turn: rounds of `block` timed calls of each, `iters` timed calls in all.

    ``fns`` maps a name to a zero-argument function that returns only when its work is done. On a shared
    machine the load drifts over seconds; timed in turn, the implementations see the same load, so their
    ratios hold where separately timed medians drift by tens of percent. With ``block > 1`` each turn starts
    with one untimed call, so that the timed calls find the implementation's own buffers in the caches, as
    back-to-back calls (and a loss right after the network that produced its logits) do; with ``block=1``
    every call follows another implementation's. Returns, per name, the median and best wall milliseconds
    and the median process CPU milliseconds (the sum over all threads).
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    wall = {name: [] for name in fns}
    cpu = {name: [] for name in fns}
    while any(len(w) < iters for w in wall.values()):
        for name, fn in fns.items():
            if block > 1:
                fn()
            for _ in range(min(block, iters - len(wall[name]))):
                c, t = time.process_time(), time.perf_counter()
                fn()
                wall[name].append((time.perf_counter() - t) * 1e3)
                cpu[name].append((time.process_time() - c) * 1e3)
    return {name: {"median_ms": statistics.median(wall[name]), "best_ms": min(wall[name]),
                   "cpu_ms": statistics.median(cpu[name])} for name in fns}
