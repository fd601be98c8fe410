"""Where XLA's time goes in combo_loss forward+backward: kernel times from the profiler, summed by name.

    python benchmarks/profile_loss.py                    # 2 x 64^3 x 6 on the default backend
    python benchmarks/profile_loss.py --shape 16x128x128x6 --top 20
    python benchmarks/profile_loss.py --dump /tmp/hlo    # also writes the optimized HLO there

Each row is one compiled kernel (an XLA fusion) with its time per call, averaged over the profiled calls.
On CPU the kernels need ``--xla_cpu_enable_xprof_traceme=true`` in XLA_FLAGS, which this script sets
before JAX starts. Kernels run concurrently on the intra-op threads, so their sum can exceed the wall time.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import statistics
import sys
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="2x64x64x64x6", help="B x spatial... x K")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--calls", type=int, default=5, help="profiled calls")
    parser.add_argument("--top", type=int, default=30, help="kernels to list")
    parser.add_argument("--dump", default=None, help="folder for the optimized HLO (XLA's --xla_dump_to)")
    args = parser.parse_args()
    shape = tuple(int(v) for v in args.shape.lower().split("x"))
    if len(shape) < 3:
        sys.exit(f"--shape: {args.shape!r} must be B x spatial... x K, e.g. 2x64x64x64x6")

    flags = [os.environ.get("XLA_FLAGS", ""), "--xla_cpu_enable_xprof_traceme=true"]
    if args.dump:
        flags += [f"--xla_dump_to={args.dump}", "--xla_dump_hlo_as_text"]
    os.environ["XLA_FLAGS"] = " ".join(f for f in flags if f)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from combo_jax import losses

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(shape, dtype=np.float32), dtype=args.dtype)
    y = jnp.asarray(rng.integers(0, shape[-1], shape[:-1]).astype(np.int32))
    step = jax.jit(jax.value_and_grad(losses.combo_loss))
    for _ in range(3):
        jax.block_until_ready(step(x, y))
    times = []
    for _ in range(15):
        start = time.perf_counter()
        jax.block_until_ready(step(x, y))
        times.append((time.perf_counter() - start) * 1e3)

    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(args.calls):
                jax.block_until_ready(step(x, y))
        (path,) = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
        with gzip.open(path) as f:
            trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    kernels = collections.defaultdict(float)
    for event in events:
        name = event.get("name", "")
        if event.get("ph") == "X" and ("fusion" in name or name.startswith("wrapped_")):
            kernels[name] += event.get("dur", 0.0) / 1e3 / args.calls

    print(f"{jax.default_backend()}: shape {args.shape} {args.dtype}; wall {statistics.median(times):.2f} ms per call "
          f"(median of 15); {len(kernels)} kernels summing to {sum(kernels.values()):.2f} ms")
    for name, ms in sorted(kernels.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"{ms:9.3f} ms  {name}")
    if args.dump:
        print(f"optimized HLO: {args.dump}/*jit_combo_loss*after_optimizations.txt")


if __name__ == "__main__":
    main()
