"""What the losses and the U-Net train step cost on an accelerator, compiled ahead of time on this CPU.

No device is needed: XLA compiles for an H100 or H200 from a target description (the CUDA PJRT plugin of
``jax[cuda12]``) and for TPU v5e / v5p topologies (``libtpu``). ``make aot`` builds the ``.venv-aot`` these
need and runs every target. For each program it reports, from the optimized HLO of the compiled executable:

* kernels: the launches of the entry computation (fusions, library calls such as cuDNN convolutions and
  cuBLAS/Triton GEMMs, copies), counted through command-buffer calls;
* bytes through kernels: the operands plus the outputs of every kernel, summed (a kernel that re-reads an
  operand internally moves more than that; one whose operand stays in L2 moves less);
* TPU bytes accessed: XLA's own count (``cost_analysis``), which leaves custom calls out, plus the operands
  and outputs of the custom calls (the Pallas kernels of the losses);
* FLOPs: XLA's count on the program (the compiled one on TPU, the lowered one elsewhere);
* peak memory: arguments + outputs + temporaries - aliased, from ``compiled.memory_analysis()``;
* the largest kernels by bytes;
* an ESTIMATE of the time, never a measurement: ``max(bytes / bandwidth, FLOPs / peak)`` plus 3-5 us per
  kernel launch on GPUs; TPU rows also give XLA's own ``optimal_seconds``.

    python benchmarks/aot.py --target h100                       # every program
    python benchmarks/aot.py --target tpu-v5e --programs combo_loss_f32,dice_ce_loss_f32
    python benchmarks/aot.py --target h100 --programs train_step_bf16 --top 10

The analysis functions (:func:`target_device`, :func:`compile_for`, :func:`kernel_stats`, :func:`analyze`)
can be imported from another script, e.g. to check a model change.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


@dataclasses.dataclass(frozen=True)
class Target:
    """An accelerator to compile for, and the figures the time estimate uses (vendor or measured, see notes)."""

    platform: str  # "cuda" or "tpu"
    topology: str  # a target description file (cuda) or a libtpu topology name (tpu)
    bandwidth: float  # bytes/s used for the estimate
    peak_flops: dict  # dtype name -> FLOP/s used for the compute floor
    launch_us: tuple[float, float]  # per-kernel launch overhead range (0 on TPU: one program, no launches)
    notes: str


TARGETS = {
    # H100 SXM: 2.9 TB/s is the device-to-device copy measured on one (3.35 TB/s on the datasheet); dense
    # bf16 989 TFLOP/s, tf32 495 (XLA's default f32 matmul/convolution precision on Hopper uses tf32).
    "h100": Target("cuda", "h100.txtpb", 3.0e12, {"bfloat16": 989e12, "float32": 495e12}, (3.0, 5.0),
                   "bandwidth 3.0 TB/s (measured copy 2.9 TB/s), launches 3-5 us"),
    # H200: the H100's compute with HBM3e; 4.3 TB/s is the copy measured on one (4.8 on the datasheet).
    "h200": Target("cuda", "h200.txtpb", 4.3e12, {"bfloat16": 989e12, "float32": 495e12}, (3.0, 5.0),
                   "bandwidth 4.3 TB/s (measured copy), launches 3-5 us"),
    # TPU v5e: 819 GB/s HBM, 197 TFLOP/s bf16; v5p: 2765 GB/s, 459 TFLOP/s (datasheets). libtpu refuses
    # single-chip topology names; the program is compiled for the first chip of the smallest slice.
    "tpu-v5e": Target("tpu", "v5e:2x2", 819e9, {"bfloat16": 197e12, "float32": 197e12 / 4}, (0.0, 0.0),
                      "bandwidth 819 GB/s, bf16 197 TFLOP/s (datasheet)"),
    "tpu-v5p": Target("tpu", "v5p:2x2x1", 2765e9, {"bfloat16": 459e12, "float32": 459e12 / 4}, (0.0, 0.0),
                      "bandwidth 2765 GB/s, bf16 459 TFLOP/s (datasheet)"),
}


def _prepare_environment(target: Target) -> None:
    """Environment that must be set before jax is imported: the CPU as the default backend, no TPU metadata."""
    if "jax" in sys.modules:
        return
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if target.platform == "tpu":
        os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
        # Compile-only processes may share a machine; libtpu's lockfile is for processes that own chips.
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def target_device(name: str):
    """The first device of a compile-only topology for target ``name`` (see ``TARGETS``)."""
    target = TARGETS[name]
    _prepare_environment(target)
    from jax.experimental import topologies

    if target.platform == "cuda":
        with open(os.path.join(HERE, "gpu_targets", target.topology)) as f:
            text = f.read()
        topology = topologies.get_topology_desc(platform="cuda", topology="1x1x1", target_config=text)
    else:
        topology = topologies.get_topology_desc(topology_name=target.topology, platform="tpu")
    return topology.devices[0]


def compile_for(fn, args, device):
    """``jax.jit(fn)`` (or an already jitted ``fn``) compiled for ``device`` with arguments shaped like ``args``.

    ``args`` are arrays or ``jax.ShapeDtypeStruct``s (pytrees allowed); nothing is allocated.
    """
    import jax

    sharding = jax.sharding.SingleDeviceSharding(device)

    def spec(a):
        return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding)

    jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
    return jitted.lower(*jax.tree.map(spec, args)).compile()


def program_flops(fn, args, platform: str | None = None) -> float:
    """XLA's FLOP count of ``fn`` as written, lowered for ``platform`` (default this CPU) before target-specific
    optimization: code that chooses its route per platform (``lax.platform_dependent``) is counted on the
    target's route."""
    import jax

    jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
    specs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), args)
    traced = jitted.trace(*specs)
    lowered = traced.lower() if platform is None else traced.lower(lowering_platforms=(platform,))
    return float(_cost(lowered).get("flops", 0.0))


# ------------------------------------------------------------------------------------------------
# Reading the optimized HLO
# ------------------------------------------------------------------------------------------------

_DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3": 1, "f8e5m2fnuz": 1, "f8e4m3fnuz": 1,
    "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8,
    "c64": 8, "c128": 16, "s4": 0.5, "u4": 0.5,
}
_SHAPE = re.compile(r"\b(" + "|".join(sorted(_DTYPE_BYTES, key=len, reverse=True)) + r")\[([0-9,]*)\]")
# Instructions that launch nothing: buffer bookkeeping and the second half of async pairs.
_NOT_KERNELS = {
    "parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "partition-id",
    "replica-id", "opt-barrier", "add-dependency", "domain",
}
_CONTROL = {"call", "while", "conditional"}


def _shape_bytes(text: str) -> float:
    total = 0.0
    for dtype, dims in _SHAPE.findall(text):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * _DTYPE_BYTES[dtype]
    return total


def _balanced(text: str, start: int) -> int:
    """Index just past the bracket group opening at ``text[start]``."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] in "([{":
            depth += 1
        elif text[i] in ")]}":
            depth -= 1
            if depth == 0:
                return i + 1
    return len(text)


def _split_top_level(text: str) -> list[str]:
    """``text`` split at the commas outside brackets (and outside HLO's /*index=5*/ comments)."""
    text = re.sub(r"/\*.*?\*/", "", text)
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p for p in parts if p.strip()]


def _parse_instruction(line: str):
    """``(name, result_type, opcode, operands, attributes)`` of one HLO instruction line, or None."""
    line = line.strip()
    if line.startswith("ROOT "):
        line = line[5:]
    if not re.match(r"%?[\w.\-]+ = ", line):
        return None
    name, rest = line.split(" = ", 1)
    if rest.startswith("("):
        end = _balanced(rest, 0)
    else:
        end = rest.find(" ")
    result, rest = rest[:end], rest[end:].lstrip()
    m = re.match(r"([\w\-]+)\(", rest)
    if not m:
        return None
    close = _balanced(rest, m.end() - 1)
    return name.lstrip("%"), result, m.group(1), rest[m.end():close - 1], rest[close:]


def _computations(hlo: str) -> tuple[dict, str]:
    """The instruction lines of every computation of an HLO module text, and the entry's name."""
    comps, entry, current = {}, None, None
    for line in hlo.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{"):  # a computation's header
            header = re.match(r"(ENTRY\s+)?%?([\w.\-]+)", line)
            current = header.group(2)
            comps[current] = []
            if header.group(1):
                entry = current
        elif line.strip() == "}":
            current = None
        elif current is not None:
            comps[current].append(line)
    return comps, entry


def _kind(opcode: str, attrs: str) -> str:
    """A readable category for a kernel."""
    if opcode == "custom-call":
        target = re.search(r'custom_call_target="([^"]+)"', attrs)
        target = target.group(1) if target else "?"
        if "cudnn" in target and "conv" in target.lower():
            return "cuDNN convolution"
        if "cublas" in target:
            return "cuBLAS GEMM"
        return f"custom-call {target}"
    if opcode == "fusion":
        kind = re.search(r"kind=(\w+)", attrs)
        kind = kind.group(1) if kind else "?"
        config = re.search(r'"kind":"(__[\w$]+)"', attrs)
        if kind == "kCustom" and config:
            name = config.group(1)
            return "Triton GEMM" if "gemm" in name else "Triton fusion" if "triton" in name else f"fusion {name}"
        return f"fusion {kind}"
    return opcode


def kernel_stats(hlo: str) -> list[dict]:
    """Every kernel launched by the entry computation of an optimized HLO module text.

    Each row: ``name``, ``kind``, ``bytes`` (operands + outputs). ``call`` instructions (GPU command buffers)
    are followed into the computation they call; the body of a ``while`` loop is counted once.
    """
    comps, entry = _computations(hlo)
    kernels = []

    def walk(comp: str):
        types = {}  # instruction name -> result type, for operands printed by name only
        for line in comps.get(comp, []):
            parsed = _parse_instruction(line)
            if parsed is None:
                continue
            name, result, opcode, operands, attrs = parsed
            types[name] = result
            if opcode in _CONTROL:
                for callee in re.findall(r"(?:to_apply|body|branch_computations|true_computation|"
                                         r"false_computation)=\{?%?([\w.\-]+(?:, %?[\w.\-]+)*)\}?", attrs):
                    for c in callee.split(","):
                        walk(c.strip().lstrip("%"))
                continue
            if opcode in _NOT_KERNELS or opcode.endswith("-done"):
                continue
            operand_bytes = 0.0
            for operand in _split_top_level(operands):
                if _SHAPE.search(operand):
                    operand_bytes += _shape_bytes(operand)
                else:
                    operand_bytes += _shape_bytes(types.get(operand.strip().lstrip("%"), ""))
            kernels.append({"name": name, "kind": _kind(opcode, attrs), "bytes": _shape_bytes(result) + operand_bytes})

    walk(entry)
    return kernels


# ------------------------------------------------------------------------------------------------
# One program's report
# ------------------------------------------------------------------------------------------------


def _cost(obj) -> dict:
    try:
        cost = obj.cost_analysis()
    except Exception:  # noqa: BLE001 - unimplemented for deviceless CUDA executables
        return {}
    if isinstance(cost, list):
        cost = cost[0] if cost else {}
    return dict(cost or {})


def analyze(compiled, target_name: str, compute_dtype: str = "float32", top: int = 5, flops: float = 0.0) -> dict:
    """The report of one compiled program (see the module docstring); all times are estimates.

    ``flops`` is used where the compiled executable has no cost analysis (deviceless CUDA executables):
    pass :func:`program_flops` of the program.
    """
    target = TARGETS[target_name]
    kernels = kernel_stats(compiled.as_text())
    total_bytes = sum(k["bytes"] for k in kernels)
    compiled_cost = _cost(compiled)
    flops = compiled_cost.get("flops") or flops
    mem = compiled.memory_analysis()
    peak = None
    if mem is not None:
        peak = getattr(mem, "peak_memory_in_bytes", 0) or (
            mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
        )
    by_kind: dict[str, int] = {}
    for k in kernels:
        by_kind[k["kind"]] = by_kind.get(k["kind"], 0) + 1
    custom_call_bytes = sum(k["bytes"] for k in kernels if k["kind"].startswith("custom-call"))
    accessed = None
    if target.platform == "tpu" and compiled_cost.get("bytes accessed") is not None:
        # XLA's own count is the better one there, but it leaves custom calls (Pallas kernels) out.
        accessed = compiled_cost["bytes accessed"] + custom_call_bytes
        memory_s = accessed / target.bandwidth
    else:
        memory_s = total_bytes / target.bandwidth
    compute_s = flops / target.peak_flops[compute_dtype]
    lo, hi = (max(memory_s, compute_s) + len(kernels) * us * 1e-6 for us in target.launch_us)
    report = {
        "kernels": len(kernels),
        "kernels_by_kind": dict(sorted(by_kind.items(), key=lambda kv: -kv[1])),
        "bytes_through_kernels": total_bytes,
        "flops": flops,
        "peak_memory_bytes": peak,
        "temp_bytes": None if mem is None else mem.temp_size_in_bytes,
        "largest_kernels": sorted(kernels, key=lambda k: -k["bytes"])[:top],
        "estimate_memory_ms": memory_s * 1e3,
        "estimate_compute_floor_ms": compute_s * 1e3,
        "estimate_ms": [lo * 1e3, hi * 1e3],
    }
    if target.platform == "tpu" and compiled_cost:
        report["xla_bytes_accessed"] = compiled_cost.get("bytes accessed")
        report["custom_call_bytes"] = custom_call_bytes
        report["bytes_accessed"] = accessed
        # XLA leaves custom calls out of its optimal time (or counts each as -1 s): no figure for such programs.
        optimal = compiled_cost.get("optimal_seconds")
        usable = optimal is not None and optimal >= 0 and not custom_call_bytes
        report["xla_optimal_ms"] = optimal * 1e3 if usable else None
    return report


# ------------------------------------------------------------------------------------------------
# The programs
# ------------------------------------------------------------------------------------------------

LOSS_SHAPE = (4, 128, 128, 128, 6)
LOSSES = ("combo_loss", "dice_ce_loss", "dice_loss")
DTYPES = {"f32": "float32", "bf16": "bfloat16"}


def _loss_program(name: str, dtype: str):
    import jax
    import jax.numpy as jnp

    from combo_jax import losses

    logits = jax.ShapeDtypeStruct(LOSS_SHAPE, jnp.dtype(dtype))
    labels = jax.ShapeDtypeStruct(LOSS_SHAPE[:-1], jnp.int32)
    return jax.jit(jax.value_and_grad(getattr(losses, name))), (logits, labels), "float32"


def _train_step_program(dtype: str):
    """The U-Net step of benchmarks/train_step.py: B = 2, 1 x 128^3 -> 6 classes, its widths, Adam."""
    import jax
    import jax.numpy as jnp

    sys.path.insert(0, HERE)
    import train_step

    step, params, opt_state = train_step.jax_step_fn(jnp.dtype(dtype), 6, options={})  # (no CPU options)
    x = jax.ShapeDtypeStruct((2, 128, 128, 128, 1), jnp.float32)
    y = jax.ShapeDtypeStruct((2, 128, 128, 128), jnp.int32)
    return step, (params, opt_state, x, y), dtype


def programs() -> dict:
    """Program name -> a function building ``(fn, args, compute dtype)``."""
    table = {}
    for loss in LOSSES:
        for short, dtype in DTYPES.items():
            table[f"{loss}_{short}"] = lambda loss=loss, dtype=dtype: _loss_program(loss, dtype)
    for short, dtype in DTYPES.items():
        table[f"train_step_{short}"] = lambda dtype=dtype: _train_step_program(dtype)
    return table


def two_pass_minimum_bytes(shape=LOSS_SHAPE, logit_bytes: int = 4, label_bytes: int = 4) -> float:
    """Bytes of a loss that reads logits and labels twice (sums, then gradient) and writes the gradient once."""
    n = 1
    for d in shape[:-1]:
        n *= d
    logits = n * shape[-1] * logit_bytes
    return 2 * (logits + n * label_bytes) + logits


def _gb(b):
    return f"{b / 1e9:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", required=True, choices=sorted(TARGETS))
    parser.add_argument("--programs", default="all", help=f"comma-separated subset of: {', '.join(programs())}")
    parser.add_argument("--top", type=int, default=5, help="largest kernels to list per program")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/aot-TARGET.json)")
    parser.add_argument("--dump", default=None, metavar="DIR",
                        help="also write each program's optimized HLO to DIR/PROGRAM-TARGET.hlo")
    args = parser.parse_args()

    table = programs()
    names = list(table) if args.programs == "all" else [p.strip() for p in args.programs.split(",") if p.strip()]
    unknown = [n for n in names if n not in table]
    if unknown:
        parser.error(f"--programs: unknown program(s) {', '.join(unknown)}; expected some of {', '.join(table)}")
    try:
        device = target_device(args.target)
    except Exception as e:  # noqa: BLE001 - the plugin or libtpu missing is the usual cause
        sys.exit(f"aot.py: cannot compile for {args.target}: {type(e).__name__}: {e}\n"
                 "The CUDA plugin and libtpu live in .venv-aot: run `make aot` (or .venv-aot/bin/python).")
    import jax

    target = TARGETS[args.target]
    print(f"target {args.target} ({device.device_kind}); jax {jax.__version__}; compiled on this CPU, no device")
    print(f"estimates (not measurements): {target.notes}")
    results = {}
    for name in names:
        fn, fn_args, compute_dtype = table[name]()
        start = time.perf_counter()
        compiled = compile_for(fn, fn_args, device)
        flops = program_flops(fn, fn_args, TARGETS[args.target].platform)
        report = analyze(compiled, args.target, compute_dtype, args.top, flops)
        report["compile_s"] = time.perf_counter() - start
        if args.dump:
            os.makedirs(args.dump, exist_ok=True)
            with open(os.path.join(args.dump, f"{name}-{args.target}.hlo"), "w") as f:
                f.write(compiled.as_text())
        results[name] = report
        xla = f"  bytes accessed {_gb(report['bytes_accessed'])} GB" if report.get("bytes_accessed") else ""
        print(f"{name}: {report['kernels']} kernels, {_gb(report['bytes_through_kernels'])} GB through kernels, "
              f"{report['flops'] / 1e9:.1f} GFLOP, compiled in {report['compile_s']:.1f} s{xla}", flush=True)

    print()
    header = f"{'program':<18} {'kernels':>7} {'GB thru kernels':>15} {'GFLOP':>9} {'peak MB':>8} {'est. ms':>15}"
    if target.platform == "tpu":
        header += f" {'GB accessed':>11} {'XLA opt. ms':>11}"
    print(header)
    for name, r in results.items():
        est = "{:.3f}-{:.3f}".format(*r["estimate_ms"]) if r["estimate_ms"][0] != r["estimate_ms"][1] else \
            f"{r['estimate_ms'][0]:.3f}"
        peak = f"{r['peak_memory_bytes'] / 1e6:8.0f}" if r["peak_memory_bytes"] is not None else "       -"
        row = f"{name:<18} {r['kernels']:>7} {_gb(r['bytes_through_kernels']):>15} {r['flops'] / 1e9:>9.1f} {peak} " \
              f"{est:>15}"
        if target.platform == "tpu":
            optimal = r.get("xla_optimal_ms")
            optimal = "n/a" if optimal is None else f"{optimal:.3f}"
            row += f" {_gb(r.get('bytes_accessed') or 0):>11} {optimal:>11}"
        print(row)
    for short, dtype in DTYPES.items():
        nbytes = 4 if dtype == "float32" else 2
        print(f"two-pass minimum of a loss at {'x'.join(map(str, LOSS_SHAPE))} {short}: "
              f"{_gb(two_pass_minimum_bytes(logit_bytes=nbytes))} GB")
    for name, r in results.items():
        kinds = ", ".join(f"{n} {k}" for k, n in r["kernels_by_kind"].items())
        print(f"\n{name}: {kinds}")
        for k in r["largest_kernels"]:
            print(f"  {k['bytes'] / 1e6:10.1f} MB  {k['kind']:<22} {k['name']}")

    out = args.out or os.path.join(HERE, "results", f"aot-{args.target}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    try:  # a run over some programs updates those and keeps the others of the same jax version
        with open(out) as f:
            previous = json.load(f)
        kept = previous["programs"] if previous.get("jax") == jax.__version__ else {}
    except (OSError, ValueError, KeyError):
        kept = {}
    with open(out + ".tmp", "w") as f:
        json.dump({"date": datetime.date.today().isoformat(), "target": args.target,
                   "device_kind": device.device_kind, "jax": jax.__version__, "estimate_basis": target.notes,
                   "programs": {**kept, **results}}, f, indent=2)
    os.replace(out + ".tmp", out)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
