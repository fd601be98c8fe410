"""Data-parallel scaling: one training step split over 1, 2 and 4 processes on this machine, and a projection
of data-parallel efficiency for the 3D configuration on 8 and 64 GPUs.

**Measured.** The same global batch and the same devices (``--devices`` fake CPU devices in all) are split over
1, 2 or 4 processes on 127.0.0.1 (``jax.distributed`` with gloo collectives), so the only difference between
the rows is the process boundary: the gradient all-reduce crosses it over loopback TCP instead of shared
memory. Each process times the jitted training step of ``train_and_evaluate`` (the config's model, loss and
optimizer) on a fixed batch, after warm-up; the row is process 0's median.

**Projected.** For ``configs/phantom3d.py``: the gradient all-reduce moves ``4 P`` bytes (``P`` float32
parameters, counted on the model ``combo_jax.train_state.make_model`` builds). A ring all-reduce over ``n`` GPUs
takes ``2 (n - 1) / n * bytes / B + 2 (n - 1) * a`` with per-GPU link bandwidth ``B`` and per-hop latency
``a`` (the flat ring); NCCL's two-level scheme (NVLink inside a node, InfiniBand across) is estimated too.
The compute time per step is XLA's FLOP count of the step, divided by the throughput the H100 anchor
measured for the widths-(32, 32, 64, 128, 256) U-Net at 128^3 (``../shared/anchors``). Efficiency is
``compute / (compute + communication)``, i.e. with no overlap of the all-reduce and the backward pass.

    python benchmarks/multihost_scaling.py                       # measure (4 minutes on 2 busy cores) and project
    python benchmarks/multihost_scaling.py --projection-only
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# H100 SXM anchor (../shared/anchors/2026-11-26-h100-unet-probe.log): a Flax U-Net with matmul up-sampling,
# widths (32, 32, 64, 128, 256), B = 2, 1 x 128^3 -> 6 classes, Adam.
ANCHOR = {"features": (32, 32, 64, 128, 256), "batch": 2, "size": 128, "classes": 6,
          "step_ms": {"bfloat16": 38.72, "float32": 74.90}}
# Links: bandwidth in bytes per second in one direction per GPU, and latency per hop. Stated assumptions:
# H100 SXM, NVLink 4: 18 links x 25 GB/s per direction = 450 GB/s per GPU, through NVSwitch inside an 8-GPU node.
NVLINK = {"bandwidth": 450e9, "latency": 3e-6}
# Between nodes: one 400 Gb/s NDR InfiniBand NIC per GPU = 50 GB/s per direction.
INFINIBAND = {"bandwidth": 50e9, "latency": 10e-6}


def ring_allreduce_s(num_bytes: float, n: int, link: dict) -> float:
    """Ring all-reduce of ``num_bytes`` over ``n`` GPUs: ``2 (n-1)/n * bytes / bandwidth + 2 (n-1) * latency``."""
    return 2 * (n - 1) / n * num_bytes / link["bandwidth"] + 2 * (n - 1) * link["latency"]


def two_level_allreduce_s(num_bytes: float, nodes: int, per_node: int) -> float:
    """Reduce-scatter inside each node (NVLink), all-reduce of each GPU's 1/per_node shard across the nodes
    (one NIC per GPU, all NICs busy at once), all-gather inside the node: what NCCL's hierarchy approaches."""
    inside = ring_allreduce_s(num_bytes, per_node, NVLINK)  # reduce-scatter + all-gather = one ring all-reduce
    return inside + ring_allreduce_s(num_bytes / per_node, nodes, INFINIBAND)


TOPOLOGIES = {
    "8 GPUs, 1 node: NVLink ring": (8, lambda b: ring_allreduce_s(b, 8, NVLINK)),
    "64 GPUs, 8 nodes: flat ring, IB hop limits": (64, lambda b: ring_allreduce_s(b, 64, INFINIBAND)),
    "64 GPUs, 8 nodes: NVLink inside, IB across": (64, lambda b: two_level_allreduce_s(b, 8, 8)),
}


# --------------------------------------------------------------------------------------------------
# One process of a measurement
# --------------------------------------------------------------------------------------------------


def worker(args) -> None:
    from combo_jax import distributed

    if args.num_processes > 1:
        distributed.initialize(f"127.0.0.1:{args.port}", args.num_processes, args.process_id, heartbeat_timeout=30)
    import jax
    import numpy as np

    from combo_jax import sharding, train_state
    from combo_jax.data import phantom
    from timing import median_ms

    config = _config(args.config)
    config.train.batch_size = args.batch
    mesh = sharding.make_mesh()
    data, replicated = sharding.data_sharding(mesh), sharding.replicated(mesh)
    graphdef, state, tx, _ = train_state.init_state(config)
    state = jax.device_put(state, replicated)
    step = jax.jit(train_state.make_train_step(graphdef, tx, train_state.make_loss_fn(config)),
                   in_shardings=(replicated, data), out_shardings=(replicated, replicated), donate_argnums=(0,))
    # This process's rows of one fixed global batch.
    share = args.batch // jax.process_count()
    cases = [phantom.make_case(config.data.seed, jax.process_index() * share + i, tuple(config.data.shape))
             for i in range(share)]
    local = {"image": np.stack([c[0] for c in cases]), "labels": np.stack([c[1] for c in cases])}
    batch = sharding.global_batch(local, data)
    holder = {"state": state}

    def run():
        holder["state"], out = step(holder["state"], batch)
        return out["loss"]

    ms = median_ms(run, lambda x: x.block_until_ready(), args.steps, args.warmup)
    with open(os.path.join(args.out_dir, f"{jax.process_index()}.json"), "w") as f:
        json.dump({"ms": ms, "devices": jax.device_count(), "local_devices": jax.local_device_count()}, f)


def _config(spec: str):
    from combo_jax.config import load_config

    return load_config(spec)


def measure(args, processes: int) -> dict:
    """Launches ``processes`` workers sharing ``args.devices`` devices; process 0's median step time."""
    if args.devices % processes or args.batch % args.devices:
        raise ValueError(f"--devices={args.devices} must divide by {processes} processes and divide --batch={args.batch}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out_dir:
        procs = []
        for p in range(processes):
            env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
                       XLA_FLAGS=f"--xla_force_host_platform_device_count={args.devices // processes}",
                       JAX_COORDINATOR_BIND_ADDRESS=f"127.0.0.1:{port}")
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", f"--config={args.config}",
                   f"--batch={args.batch}", f"--steps={args.steps}", f"--warmup={args.warmup}", f"--out_dir={out_dir}",
                   f"--num_processes={processes}", f"--process_id={p}", f"--port={port}"]
            procs.append(subprocess.Popen(cmd, env=env, cwd=os.path.join(ROOT, "benchmarks"),
                                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
        started = time.time()
        for proc in procs:
            try:
                _, err = proc.communicate(timeout=max(600 - (time.time() - started), 1))
            except subprocess.TimeoutExpired:
                for other in procs:
                    other.kill()
                raise
            if proc.returncode:
                raise RuntimeError(f"{processes} processes: a worker failed:\n{err[-3000:]}")
        with open(os.path.join(out_dir, "0.json")) as f:
            result = json.load(f)
    return {"processes": processes, "devices_per_process": args.devices // processes, **result}


# --------------------------------------------------------------------------------------------------
# The projection
# --------------------------------------------------------------------------------------------------


def _step_flops(config, batch: int) -> float:
    """XLA's FLOP count of one training step on ``batch`` samples (lowered, never run)."""
    import jax
    import numpy as np

    from combo_jax import train_state

    graphdef, state, tx, _ = train_state.init_state(config)
    shape = tuple(config.data.shape)
    batch_spec = {"image": jax.ShapeDtypeStruct((batch, *shape, 1), np.float32),
                  "labels": jax.ShapeDtypeStruct((batch, *shape), np.int32)}
    lowered = jax.jit(train_state.make_train_step(graphdef, tx, train_state.make_loss_fn(config))).lower(state, batch_spec)
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def project(args) -> dict:
    import jax
    from flax import nnx

    from combo_jax import train_state

    config = _config("phantom3d")
    model = train_state.make_model(config, rngs=nnx.Rngs(params=0))
    num_params = sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    grad_bytes = 4 * num_params  # float32 gradients (parameters stay float32 under bfloat16 compute)

    anchor = _config("phantom3d")
    anchor.model.features = ANCHOR["features"]
    anchor.data.shape = (ANCHOR["size"],) * 3
    anchor_flops = _step_flops(anchor, ANCHOR["batch"])
    sample_flops = _step_flops(config, 1)
    rows = []
    for dtype, anchor_ms in ANCHOR["step_ms"].items():
        throughput = anchor_flops / (anchor_ms * 1e-3)  # FLOP/s the anchor achieved
        for per_gpu in args.per_gpu_batch:
            compute_s = sample_flops * per_gpu / throughput
            for topology, (n, allreduce_s) in TOPOLOGIES.items():
                comm_s = allreduce_s(grad_bytes)
                rows.append({"dtype": dtype, "topology": topology, "gpus": n, "per_gpu_batch": per_gpu,
                             "global_batch": per_gpu * n, "compute_ms": compute_s * 1e3, "allreduce_ms": comm_s * 1e3,
                             "efficiency": compute_s / (compute_s + comm_s)})
    return {"config": "configs/phantom3d.py", "features": list(config.model.features), "shape": list(config.data.shape),
            "parameters": num_params, "gradient_bytes": grad_bytes, "step_gflop_per_sample": sample_flops / 1e9,
            "anchor": {**ANCHOR, "features": list(ANCHOR["features"]), "step_gflop": anchor_flops / 1e9},
            "links": {"nvlink": NVLINK, "infiniband": INFINIBAND}, "rows": rows}


# --------------------------------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="default", help="the config to time (a shipped name or a file)")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--devices", type=int, default=4, help="CPU devices in all, split over the processes")
    parser.add_argument("--batch", type=int, default=8, help="global batch")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--per_gpu_batch", type=int, nargs="+", default=[1, 4],
                        help="projection: samples per GPU (4 is the config's batch on one GPU)")
    parser.add_argument("--projection-only", action="store_true")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "multihost_scaling.json"))
    # worker-only arguments
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--num_processes", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--process_id", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--out_dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    result = {"date": datetime.date.today().isoformat(),
              "host": f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"}
    if not args.projection_only:
        result["measured"] = {"config": args.config, "global_batch": args.batch, "devices": args.devices,
                              "steps": args.steps, "warmup": args.warmup, "rows": []}
        print(f"Measured: {args.config}, global batch {args.batch} on {args.devices} CPU devices in all, "
              f"median of {args.steps} steps after {args.warmup} warm-up")
        print(f"{'processes':>9} {'devices/process':>15} {'ms/step':>9} {'vs 1 process':>12}")
        for n in args.processes:
            row = measure(args, n)
            result["measured"]["rows"].append(row)
            base = result["measured"]["rows"][0]["ms"]
            print(f"{n:>9} {row['devices_per_process']:>15} {row['ms']:>9.1f} {row['ms'] / base:>11.2f}x", flush=True)

    proj = project(args)
    result["projection"] = proj
    print(f"\nProjected: {proj['config']} U-Net {tuple(proj['features'])} on {'x'.join(map(str, proj['shape']))}: "
          f"{proj['parameters']:,} parameters -> {proj['gradient_bytes'] / 1e6:.2f} MB of float32 gradients per "
          f"all-reduce; {proj['step_gflop_per_sample']:.1f} GFLOP per sample per step (XLA count)")
    print(f"Compute from the H100 anchor ({proj['anchor']['step_gflop']:.0f} GFLOP step of the 128^3 U-Net in "
          f"{ANCHOR['step_ms']['bfloat16']} ms bf16 / {ANCHOR['step_ms']['float32']} ms fp32), "
          f"no overlap of all-reduce and backward:")
    print(f"{'dtype':>8} {'topology':<44} {'batch/GPU':>9} {'global batch':>12} {'compute ms':>10} {'all-reduce ms':>13} {'efficiency':>10}")
    for r in proj["rows"]:
        print(f"{r['dtype']:>8} {r['topology']:<44} {r['per_gpu_batch']:>9} {r['global_batch']:>12} {r['compute_ms']:>10.2f} "
              f"{r['allreduce_ms']:>13.3f} {r['efficiency']:>10.1%}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nwrote {os.path.relpath(args.out, ROOT)}")


if __name__ == "__main__":
    main()
