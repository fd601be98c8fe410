"""Forward+backward time of combo_jax.combo_loss against the PyTorch peers, in one process, same inputs.

Peers: MONAI DiceCELoss(softmax=True, to_onehot_y=True), our PyTorch reference combo_loss eagerly and under
torch.compile. Also each MONAI region loss against ours with the same semantics, all with their defaults and
softmax=True, to_onehot_y=True: DiceCELoss / dice_ce_loss, DiceLoss / dice_loss, GeneralizedDiceLoss /
generalized_dice_loss, TverskyLoss / tversky_loss. Runs on the GPU when JAX and torch
both see one, else on the CPU. Prints a ratio table (time / the MONAI peer's time) and writes JSON.

    python benchmarks/losses.py                      # the issue's CPU shapes
    python benchmarks/losses.py --shapes 4x128x128x128x6 --dtypes float32,bfloat16   # the GPU shape
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform

import jax
import jax.numpy as jnp
import numpy as np
import torch

from combo_jax import losses
from combo_jax.reference import torch_losses
from timing import median_ms


def parse_shape(text: str) -> tuple[int, ...]:
    dims = tuple(int(v) for v in text.lower().split("x"))
    if len(dims) < 4:
        raise argparse.ArgumentTypeError(f"--shapes: {text!r} must be B x spatial... x K, e.g. 2x64x64x64x6")
    return dims


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="2x64x64x64x6,16x128x128x6", help="comma-separated B x spatial x K")
    parser.add_argument("--dtypes", default="float32", help="logit dtypes for the JAX side (float32, bfloat16)")
    parser.add_argument("--iters", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile peer")
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
    rows = []
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
        peers["torch reference combo (eager)"] = torch_step(lambda: torch_losses.combo_loss(xt, yt))
        if not args.no_compile:
            compiled = torch.compile(torch_losses.combo_loss)
            peers["torch reference combo (compile)"] = torch_step(lambda: compiled(xt, yt))
        timings = {name: median_ms(fn, tsync, args.iters, args.warmup) for name, fn in peers.items()}

        for dtype in args.dtypes.split(","):
            xj = jnp.asarray(x_np, dtype=dtype)
            yj = jnp.asarray(y_np)
            step = jax.jit(jax.value_and_grad(losses.combo_loss))
            timings[f"combo_jax combo_loss ({dtype})"] = median_ms(
                lambda: step(xj, yj), jax.block_until_ready, args.iters, args.warmup
            )
        xj, yj = jnp.asarray(x_np), jnp.asarray(y_np)
        peer_of = {}
        for monai_name, name in pairs.items():
            step = jax.jit(jax.value_and_grad(getattr(losses, name)))
            impl = f"combo_jax {name} (float32)"
            timings[impl] = median_ms(lambda: step(xj, yj), jax.block_until_ready, args.iters, args.warmup)
            peer_of[impl] = peer_of[f"MONAI {monai_name}"] = f"MONAI {monai_name}"
        for name, ms in timings.items():
            peer = peer_of.get(name, "MONAI DiceCELoss")
            rows.append({"shape": shape_text, "impl": name, "ms": round(ms, 3), "peer": peer,
                         "ratio_to_monai": round(ms / timings[peer], 3)})

    print(f"device: {device_name}; jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__}")
    print(f"{'shape':>18}  {'implementation':<42} {'ms':>9}  {'x peer':>7}  peer")
    for row in rows:
        print(f"{row['shape']:>18}  {row['impl']:<42} {row['ms']:>9.3f}  {row['ratio_to_monai']:>7.3f}  {row['peer']}")
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
            },
            f,
            indent=2,
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
