"""One U-Net training step, combo_jax against MONAI BasicUNet with the same widths, loss and optimizer.

Both sides: widths (32, 32, 64, 128, 256), instance norm, Dice + cross-entropy (MONAI DiceCELoss semantics),
Adam, one input channel, 6 classes. JAX: our NNX U-Net under one jitted step with buffer donation, float32
or bfloat16 compute. PyTorch: MONAI BasicUNet in float32 and under bfloat16 autocast. Prints ms per step,
the ratio to MONAI fp32 in the same run, and achieved TFLOP/s (XLA's count of the JAX step's FLOPs).

    python benchmarks/train_step.py                                # CPU-sized: B=2, 32^3
    python benchmarks/train_step.py --batch 2 --size 128           # the GPU configuration

Needs jax, flax, optax, torch and MONAI only: the repository is put on the path, installed or not. Targets on
an H200 at B=2, 128^3: at most 20 ms bf16 and 45 ms fp32 (BENCHMARKS.md has the ahead-of-time figures).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform

import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo, installed or not
from combo_jax import losses  # noqa: E402
from combo_jax.models.unet import REMAT_POLICIES, UNet, compiler_options  # noqa: E402
from timing import median_ms  # noqa: E402

FEATURES = (32, 32, 64, 128, 256)


def jax_step_fn(dtype, classes, *, features=FEATURES, remat=False, options=None):
    """The jitted step, its parameters and optimizer state; ``options``: XLA compiler options (by default those
    the trainer uses on this backend, ``compiler_options()``)."""
    model = UNet(spatial_dims=3, in_channels=1, num_classes=classes, features=features, dtype=dtype, remat=remat,
                 rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    tx = optax.adam(1e-4)
    opt_state = tx.init(params)

    def step(params, opt_state, x, y):
        def objective(p):
            return losses.dice_ce_loss(nnx.merge(graphdef, p)(x), y)

        loss, grads = jax.value_and_grad(objective)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    options = compiler_options() if options is None else options
    return jax.jit(step, donate_argnums=(0, 1), compiler_options=options), params, opt_state


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--classes", type=int, default=6)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--remat", default="none", choices=list(REMAT_POLICIES), help="the U-Net's remat policy")
    parser.add_argument("--out", default="benchmarks/results/train_step.json")
    args = parser.parse_args()

    import torch

    on_gpu = jax.default_backend() == "gpu" and torch.cuda.is_available()
    dev = "cuda" if on_gpu else "cpu"
    device_name = torch.cuda.get_device_name() if on_gpu else f"{platform.processor() or 'cpu'} ({os.cpu_count()} cores)"
    b, s, k = args.batch, args.size, args.classes
    rng = np.random.default_rng(0)
    x_np = rng.standard_normal((b, s, s, s, 1), dtype=np.float32)
    y_np = rng.integers(0, k, (b, s, s, s)).astype(np.int32)

    def tsync(out):
        if on_gpu:
            torch.cuda.synchronize()
        return out

    # MONAI BasicUNet: the 6th width is the last up-sampling block's, matching our first level.
    from monai.losses import DiceCELoss
    from monai.networks.nets import BasicUNet

    net = BasicUNet(spatial_dims=3, in_channels=1, out_channels=k, features=(*FEATURES, FEATURES[0])).to(dev)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    loss_fn = DiceCELoss(softmax=True, to_onehot_y=True)
    xt = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x_np, -1, 1))).to(dev)
    yt = torch.from_numpy(y_np).long().unsqueeze(1).to(dev)

    def torch_step(autocast):
        def step():
            opt.zero_grad(set_to_none=True)
            with torch.autocast(dev, dtype=torch.bfloat16, enabled=autocast):
                loss = loss_fn(net(xt), yt)
            loss.backward()
            opt.step()
            return loss

        return step

    rows = {}
    rows["MONAI BasicUNet fp32"] = (median_ms(torch_step(False), tsync, args.iters, args.warmup), None)
    rows["MONAI BasicUNet bf16 autocast"] = (median_ms(torch_step(True), tsync, args.iters, args.warmup), None)

    x, y = jnp.asarray(x_np), jnp.asarray(y_np)
    for name, dtype in (("combo_jax UNet fp32", jnp.float32), ("combo_jax UNet bf16", jnp.bfloat16)):
        step, params, opt_state = jax_step_fn(dtype, k, remat=args.remat)
        cost = step.lower(params, opt_state, x, y).compile().cost_analysis()
        flops = float((cost[0] if isinstance(cost, list) else cost).get("flops", 0.0))
        state = {"params": params, "opt": opt_state}

        def run():
            state["params"], state["opt"], loss = step(state["params"], state["opt"], x, y)
            return loss

        rows[name] = (median_ms(run, jax.block_until_ready, args.iters, args.warmup), flops)

    base = rows["MONAI BasicUNet fp32"][0]
    print(f"device: {device_name}; jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__}")
    print(f"train step, B={b}, 1x{s}^3 -> {k} classes, widths {FEATURES}, Adam, Dice+CE, remat {args.remat}")
    print(f"{'implementation':<32} {'ms/step':>9} {'x MONAI fp32':>13} {'TFLOP/s':>8}")
    out = []
    for name, (ms, flops) in rows.items():
        tflops = f"{flops / ms / 1e9:8.3f}" if flops else "       -"
        print(f"{name:<32} {ms:9.2f} {ms / base:13.3f} {tflops}")
        out.append({"impl": name, "ms": round(ms, 3), "ratio_to_monai_fp32": round(ms / base, 3),
                    "tflops": round(flops / ms / 1e9, 3) if flops else None})
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"date": datetime.date.today().isoformat(), "device": device_name, "batch": b, "size": s,
                   "classes": k, "rows": out}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
