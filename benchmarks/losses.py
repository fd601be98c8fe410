"""Forward+backward time of combo_jax.combo_loss against the PyTorch peers, in one process, same inputs.

Peers: MONAI DiceCELoss(softmax=True, to_onehot_y=True), our PyTorch reference combo_loss eagerly and under
torch.compile. Also each MONAI region loss against ours with the same semantics, all with their defaults and
softmax=True, to_onehot_y=True: DiceCELoss / dice_ce_loss, DiceLoss / dice_loss, GeneralizedDiceLoss /
generalized_dice_loss, TverskyLoss / tversky_loss. A JAX peer too: optax's dice_loss plus its softmax
cross-entropy, with the time of its compile + first call next to ours (many-class shapes: the compile of a
loss written per class grows with K). Runs on the GPU when JAX and torch both see one, else on the CPU.
The torch peers of a shape are timed in turn (rounds of --block back-to-back calls of each, after one untimed
call), and then the JAX implementations the same way, so that the implementations compared see the same load.
Prints a ratio table (time / the peer's time) and writes JSON.

Before timing, it checks the compiled fast path (on a GPU the Pallas kernels, on a CPU the XLA:CPU routine)
against autodiff of the plain formula written out here, for every loss timed and every logit dtype, and
prints the largest relative difference of the value and of the gradient, and which routine the compiled
program holds (a Pallas/Triton custom call or not).

    python benchmarks/losses.py                      # the CPU shapes, K = 6, 105 and 117
    python benchmarks/losses.py --shapes 4x128x128x128x6 --dtypes float32,bfloat16 --no-compile  # the GPU shape
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform

# JAX and torch share the GPU: JAX must not take 75% of its memory up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import jax.numpy as jnp
import numpy as np
import torch

from combo_jax import losses
from combo_jax.reference import torch_losses
import optax

from timing import first_call_s, interleaved


def parse_shape(text: str) -> tuple[int, ...]:
    dims = tuple(int(v) for v in text.lower().split("x"))
    if len(dims) < 4:
        raise argparse.ArgumentTypeError(f"--shapes: {text!r} must be B x spatial... x K, e.g. 2x64x64x64x6")
    return dims


def optax_dice_ce(logits, labels):
    """optax's Dice loss (per sample, mean over classes) plus its softmax cross-entropy, batch means."""
    onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
    logits = logits.astype(jnp.float32)
    dice = optax.losses.dice_loss(logits, onehot)
    return jnp.mean(dice) + jnp.mean(optax.losses.softmax_cross_entropy_with_integer_labels(logits, labels))


def plain_combo(logits, labels, alpha=0.5, beta=0.5, smooth=1.0):
    """combo_loss's defaults written plainly (softmax; cross-entropy over the organs, Dice over the background and
    the organs, per sample); autodiff differentiates it."""
    x = logits.astype(jnp.float32)
    k = x.shape[-1]
    logp = jax.nn.log_softmax(x, axis=-1)
    p, t = jnp.exp(logp), jax.nn.one_hot(labels, k, dtype=jnp.float32)
    # log(1 - p_k): log1p(-p_k) below 1/2; above (the argmax alone), the log-sum-exp of the other channels.
    high = p > 0.5
    rest = jax.nn.logsumexp(jnp.where(high, -jnp.inf, x), axis=-1, keepdims=True)
    log1m = jnp.where(high, rest - jax.nn.logsumexp(x, axis=-1, keepdims=True), jnp.log1p(-jnp.where(high, 0.5, p)))
    ce = -(beta * t * logp + (1 - beta) * (1 - t) * log1m)[..., 1:]
    axes = tuple(range(1, x.ndim - 1))
    dice = (2 * jnp.sum(p * t, axes) + smooth) / (jnp.sum(p, axes) + jnp.sum(t, axes) + smooth)
    return alpha * jnp.mean(ce) - (1 - alpha) * jnp.mean(dice)


def plain_dice_ce(logits, labels):
    """dice_ce_loss's defaults (MONAI DiceCELoss) written plainly."""
    x = logits.astype(jnp.float32)
    logp = jax.nn.log_softmax(x, axis=-1)
    p, t = jnp.exp(logp), jax.nn.one_hot(labels, x.shape[-1], dtype=jnp.float32)
    axes = tuple(range(1, x.ndim - 1))
    dice = (2 * jnp.sum(p * t, axes) + 1e-5) / (jnp.sum(p, axes) + jnp.sum(t, axes) + 1e-5)
    return jnp.mean(1 - dice) - jnp.mean(jnp.sum(t * logp, -1))


PLAIN = {"combo_loss": plain_combo, "dice_ce_loss": plain_dice_ce}


def jax_call(step, *args):
    """A zero-argument call of a jitted function that returns when its result is ready."""
    return lambda: jax.block_until_ready(step(*args))


def check_fast_path(x, y) -> list[dict]:
    """The compiled fast path against autodiff of the plain formula: value and gradient, relative differences."""
    rows = []
    for name, plain in PLAIN.items():
        fast = jax.jit(jax.value_and_grad(getattr(losses, name))).lower(x, y).compile()
        hlo = fast.as_text()
        value, grad = fast(x, y)
        want, want_grad = jax.jit(jax.value_and_grad(plain))(x, y)
        grad, want_grad = grad.astype(jnp.float32), want_grad.astype(jnp.float32)
        rows.append({
            "loss": name, "dtype": str(x.dtype),
            "pallas": "triton" in hlo or "tpu_custom_call" in hlo or "mosaic" in hlo.lower(),
            "value_rel_diff": float(jnp.abs(value - want) / jnp.maximum(jnp.abs(want), 1e-30)),
            "grad_rel_diff": float(jnp.max(jnp.abs(grad - want_grad)) / jnp.max(jnp.abs(want_grad))),
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="2x64x64x64x6,16x128x128x6,2x16x16x16x105,1x96x96x96x117",
                        help="comma-separated B x spatial x K")
    parser.add_argument("--dtypes", default="float32", help="logit dtypes for the JAX side (float32, bfloat16)")
    parser.add_argument("--iters", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--block", type=int, default=3,
                        help="timed calls of one implementation per turn, after one untimed call (1: every call "
                             "follows another implementation's, with caches cold)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile peer")
    parser.add_argument("--no-reference", action="store_true",
                        help="skip our PyTorch reference (eager and compiled); slow at many classes on a CPU")
    parser.add_argument("--out", default="benchmarks/results/losses.json")
    args = parser.parse_args()

    on_gpu = jax.default_backend() == "gpu" and torch.cuda.is_available()
    tdev = "cuda" if on_gpu else "cpu"
    device_name = torch.cuda.get_device_name() if on_gpu else f"{platform.processor() or 'cpu'} ({os.cpu_count()} cores)"

    def tsync(out):
        if on_gpu:
            torch.cuda.synchronize()
        return out

    import monai.losses

    # MONAI loss class -> our function with the same semantics (defaults on both sides).
    pairs = {"DiceCELoss": "dice_ce_loss", "DiceLoss": "dice_loss", "GeneralizedDiceLoss": "generalized_dice_loss",
             "TverskyLoss": "tversky_loss"}
    monai_losses = {name: getattr(monai.losses, name)(softmax=True, to_onehot_y=True) for name in pairs}
    rows, checks = [], []
    for shape_text in args.shapes.split(","):
        shape = parse_shape(shape_text)
        b, k = shape[0], shape[-1]
        rng = np.random.default_rng(0)
        x_np = rng.standard_normal(shape, dtype=np.float32)
        y_np = rng.integers(0, k, shape[:-1]).astype(np.int32)

        # torch peers: channels-first
        xt = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x_np, -1, 1))).to(tdev).requires_grad_(True)
        yt = torch.from_numpy(y_np).long().to(tdev)
        yt1 = yt.unsqueeze(1)

        def torch_step(loss_fn):
            def step():
                xt.grad = None
                loss = loss_fn()
                loss.backward()
                return loss

            return step

        peers = {f"MONAI {name}": torch_step(functools.partial(module, xt, yt1)) for name, module in monai_losses.items()}
        if not args.no_reference:
            peers["torch reference combo (eager)"] = torch_step(lambda: torch_losses.combo_loss(xt, yt))
        if not (args.no_compile or args.no_reference):
            compiled = torch.compile(torch_losses.combo_loss)
            peers["torch reference combo (compile)"] = torch_step(lambda: compiled(xt, yt))
        torch_calls = {name: (lambda fn=fn: tsync(fn())) for name, fn in peers.items()}
        calls = {}

        first_calls = {}
        for dtype in args.dtypes.split(","):
            xj = jnp.asarray(x_np, dtype=dtype)
            yj = jnp.asarray(y_np)
            checks += [{"shape": shape_text, **row} for row in check_fast_path(xj, yj)]
            for impl, fn in ((f"combo_jax combo_loss ({dtype})", losses.combo_loss),
                             (f"optax dice_loss + softmax CE ({dtype})", optax_dice_ce)):
                step = jax.jit(jax.value_and_grad(fn))
                first_calls[impl] = first_call_s(lambda: step(xj, yj), jax.block_until_ready)
                calls[impl] = jax_call(step, xj, yj)
        xj, yj = jnp.asarray(x_np), jnp.asarray(y_np)
        peer_of = {impl: f"optax dice_loss + softmax CE ({impl.split('(')[-1]}" for impl in first_calls
                   if impl.startswith("combo_jax")}
        for monai_name, name in pairs.items():
            step = jax.jit(jax.value_and_grad(getattr(losses, name)))
            impl = f"combo_jax {name} (float32)"
            calls[impl] = jax_call(step, xj, yj)
            peer_of[impl] = peer_of[f"MONAI {monai_name}"] = f"MONAI {monai_name}"
        # The implementations of this shape timed in turn (rounds of --block calls of each), so that all see the
        # same load: the torch peers, then the JAX ones (torch's idle OpenMP threads spin for a while after each
        # call and would slow whichever JAX call came next).
        timings = {name: t["median_ms"] for group in (torch_calls, calls)
                   for name, t in interleaved(group, args.iters, args.warmup, args.block).items()}
        for name, ms in timings.items():
            peer = peer_of.get(name, "MONAI DiceCELoss")
            rows.append({"shape": shape_text, "impl": name, "ms": round(ms, 3), "peer": peer,
                         "ratio_to_peer": round(ms / timings[peer], 3),
                         "ratio_to_monai_dice_ce": round(ms / timings["MONAI DiceCELoss"], 3),
                         "compile_and_first_call_s": round(first_calls[name], 3) if name in first_calls else None})

    print(f"device: {device_name}; jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__}")
    print("fast path against autodiff of the plain formula (largest relative difference):")
    for c in checks:
        print(f"  {c['shape']:>18}  {c['loss']:<13} {c['dtype']:<9} value {c['value_rel_diff']:.1e}  "
              f"gradient {c['grad_rel_diff']:.1e}  {'Pallas kernels' if c['pallas'] else 'XLA routine'}")
    print(f"{'shape':>18}  {'implementation':<42} {'ms':>9}  {'x peer':>7}  {'x DiceCE':>8}  {'1st call s':>10}  peer")
    for row in rows:
        first = row["compile_and_first_call_s"]
        first = "" if first is None else f"{first:.2f}"
        print(f"{row['shape']:>18}  {row['impl']:<42} {row['ms']:>9.3f}  {row['ratio_to_peer']:>7.3f}  "
              f"{row['ratio_to_monai_dice_ce']:>8.3f}  {first:>10}  {row['peer']}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(
            {
                "date": datetime.date.today().isoformat(),
                "device": device_name,
                "jax": jax.__version__,
                "torch": torch.__version__,
                "iters": args.iters,
                "rows": rows,
                "fast_path_checks": checks,
            },
            f,
            indent=2,
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
