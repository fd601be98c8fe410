"""Whole-volume inference: combo_jax's on-device sliding windows against MONAI's sliding_window_inference.

Both sides: a 3D U-Net of the same widths (ours; MONAI BasicUNet), one input channel, 6 classes, window 96^3,
overlap 0.5, Gaussian weighting, 4 windows per forward pass, a synthetic volume, float32; the timed result is the
label map on the host (ours: argmax on the device, only the label map transferred; MONAI: its returned logits,
then argmax). The first call of each (compilation, warm-up) is not timed. Prints the median of --iters calls and
the ratio, and, to tell the network's time from the sliding-window machinery's, each side's network alone on as
many batches of windows; writes JSON.

    python benchmarks/sliding_window.py                                  # 256 x 256 x 160, widths (8, 16, 32, 64, 128)
    python benchmarks/sliding_window.py --shape 128,128,96 --iters 1     # a quick look
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from combo_jax.inference import DevicePredictor
from combo_jax.models.unet import UNet, compiler_options
from combo_jax.sharding import make_mesh


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="256,256,160")
    parser.add_argument("--window", type=int, default=96)
    parser.add_argument("--features", default="8,16,32,64,128", help="five widths (BasicUNet has five levels)")
    parser.add_argument("--classes", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/sliding_window.json")
    args = parser.parse_args()
    shape = tuple(int(s) for s in args.shape.split(","))
    features = tuple(int(f) for f in args.features.split(","))
    window = (args.window,) * 3
    on_gpu = jax.default_backend() == "gpu" and torch.cuda.is_available()
    dev = "cuda" if on_gpu else "cpu"
    device_name = torch.cuda.get_device_name() if on_gpu else f"{platform.processor() or 'cpu'} ({os.cpu_count()} cores)"
    image = np.random.default_rng(0).normal(size=(*shape, 1)).astype(np.float32)

    def timed(fn):
        fn()  # compile / warm up
        times = []
        for _ in range(args.iters):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return float(np.median(times))

    # MONAI.
    from monai.inferers import sliding_window_inference
    from monai.networks.nets import BasicUNet

    if len(features) != 5:
        raise SystemExit("--features: give five widths, as MONAI BasicUNet has five levels")
    # BasicUNet's sixth width is its last up-sampling block's, our first level's.
    net = BasicUNet(spatial_dims=3, in_channels=1, out_channels=args.classes, features=(*features, features[0])).to(dev).eval()
    x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(image, -1, 0)[None])).to(dev)

    def monai_run():
        with torch.no_grad():
            logits = sliding_window_inference(x, window, args.batch, net, overlap=0.5, mode="gaussian")
            return torch.argmax(logits, dim=1).cpu().numpy()

    monai_s = timed(monai_run)
    from combo_jax.inference import window_starts

    batches = -(-len(window_starts(shape, window, 0.5)) // args.batch)
    xw = torch.zeros((args.batch, 1, *window), device=dev)

    def monai_model_only():
        with torch.no_grad():
            for _ in range(batches):
                out = net(xw)
            if on_gpu:
                torch.cuda.synchronize()
            return out

    monai_model_s = timed(monai_model_only)

    # combo_jax.
    model = UNet(spatial_dims=3, in_channels=1, num_classes=args.classes, features=features, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    mesh = make_mesh() if jax.device_count() > 1 and args.batch % jax.device_count() == 0 else None
    predictor = DevicePredictor(lambda p, w: nnx.merge(graphdef, p)(w), window=window, overlap=0.5,
                                batch_size=args.batch, mesh=mesh)
    params = jax.device_put(params)
    ours_s = timed(lambda: predictor(params, image).get())
    # The network alone on as many batches, in one jitted loop as the predictor runs it (a top-level call per
    # batch measured 3-4x slower per batch on XLA:CPU than the same network inside a loop).
    def forward_batches(p, w):
        def body(total, _):
            return total + jnp.sum(nnx.merge(graphdef, p)(w + total * 0.0)), None

        return jax.lax.scan(body, jnp.float32(0), None, length=batches)[0]

    apply = jax.jit(forward_batches, compiler_options=compiler_options())
    windows = jax.device_put(np.random.default_rng(1).normal(size=(args.batch, *window, 1)).astype(np.float32))

    def ours_model_only():
        return jax.block_until_ready(apply(params, windows))

    ours_model_s = timed(ours_model_only)

    print(f"device: {device_name}; jax {jax.__version__} ({jax.default_backend()}, {jax.device_count()} device(s)), "
          f"torch {torch.__version__}")
    print(f"volume {shape}, window {window}, overlap 0.5, {args.batch} windows per pass, widths {features}")
    print(f"{batches} batches of {args.batch} windows; 'model alone' runs the network on as many batches, so the "
          "rest of the time is the sliding-window machinery")
    print(f"{'implementation':<40} {'s':>8} {'x MONAI':>8} {'model alone s':>14} {'machinery s':>12}")
    print(f"{'MONAI sliding_window_inference':<40} {monai_s:8.2f} {1.0:8.3f} {monai_model_s:14.2f} "
          f"{monai_s - monai_model_s:12.2f}")
    print(f"{'combo_jax DevicePredictor':<40} {ours_s:8.2f} {ours_s / monai_s:8.3f} {ours_model_s:14.2f} "
          f"{ours_s - ours_model_s:12.2f}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"date": datetime.date.today().isoformat(), "device": device_name, "shape": shape, "window": window,
                   "features": features, "batch": args.batch, "monai_s": monai_s, "combo_jax_s": ours_s,
                   "windows_batches": batches, "monai_model_s": monai_model_s, "combo_jax_model_s": ours_model_s,
                   "ratio": ours_s / monai_s, "jax": jax.__version__, "torch": torch.__version__}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
