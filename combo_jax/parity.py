"""Parity report: every loss of combo_jax against our PyTorch reference and against MONAI.

    python -m combo_jax.parity            # float32, the default grid
    python -m combo_jax.parity --x64      # float64 on both sides
    python -m combo_jax.parity --json out.json

For each loss and a grid of options (2D and 3D, K from 2 to 14, softmax and sigmoid, batch Dice, with and
without background, with and without a voxel mask), the value and the gradient d loss / d logits are
computed by JAX (channels-last) and by the PyTorch side (channels-first, converted at the boundary), and
the table shows the largest absolute and relative error of each. MONAI is compared where it has the same
loss (DiceLoss, DiceCELoss, GeneralizedDiceLoss, TverskyLoss, FocalLoss) and the same options; it has no
voxel mask, so masked rows compare against our reference only. Needs the ``test`` extra (torch, monai).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from collections.abc import Callable

import jax
import numpy as np

TOLERANCE = {"float32": 1e-5, "float64": 1e-10}


def _cases():
    """Yields (loss name, options, monai factory or None) over the grid."""
    acts = ("softmax", "sigmoid")
    for act, bg, batch in itertools.product(acts, (False, True), (False, True)):
        yield "combo_loss", dict(activation=act, include_background=bg, batch_dice=batch, beta=0.3, alpha=0.6), None
    for act, beta in itertools.product(acts, (0.2, 0.5, 0.8)):
        yield "weighted_cross_entropy", dict(activation=act, beta=beta), None
    for act, smoothing, weighted in itertools.product(acts, (0.0, 0.1), (False, True)):
        yield "cross_entropy", dict(activation=act, label_smoothing=smoothing, weighted=weighted), None
    for act, bg, batch, sq, jac in itertools.product(acts, (False, True), (False, True), (False, True), (False, True)):
        if sq and jac:
            continue
        opts = dict(activation=act, include_background=bg, batch_dice=batch, squared_pred=sq, jaccard=jac)
        yield "dice_loss", opts, _monai_dice
    for bg, batch, weighted in itertools.product((False, True), (False, True), (False, True)):
        opts = dict(activation="softmax", include_background=bg, batch_dice=batch, weighted=weighted)
        yield "dice_ce_loss", opts, _monai_dice_ce
    for act, w_type, batch in itertools.product(acts, ("square", "simple", "uniform"), (False, True)):
        yield "generalized_dice_loss", dict(activation=act, w_type=w_type, batch_dice=batch), _monai_gdl
    for act, (a, b) in itertools.product(acts, ((0.3, 0.7), (0.7, 0.3), (0.5, 0.5))):
        yield "tversky_loss", dict(activation=act, alpha=a, beta=b), _monai_tversky
    for act, bg, alpha in itertools.product(acts, (False, True), (None, 0.25)):
        if act == "softmax" and not bg:
            # MONAI takes that softmax over the foreground channels only; ours spans all channels.
            yield "focal_loss", dict(activation=act, include_background=bg, alpha=alpha, gamma=2.0), None
        else:
            yield "focal_loss", dict(activation=act, include_background=bg, alpha=alpha, gamma=2.0), _monai_focal


def _monai_dice(opts, k, weights):
    from monai.losses import DiceLoss

    return DiceLoss(
        include_background=opts["include_background"],
        to_onehot_y=True,
        softmax=opts["activation"] == "softmax",
        sigmoid=opts["activation"] == "sigmoid",
        squared_pred=opts["squared_pred"],
        jaccard=opts["jaccard"],
        batch=opts["batch_dice"],
    )


def _monai_dice_ce(opts, k, weights):
    import torch
    from monai.losses import DiceCELoss

    if weights is not None and k == 2 and not opts["include_background"]:
        return None  # MONAI's DiceLoss ignores class weights when a single channel is left; ours applies them.

    return DiceCELoss(
        include_background=opts["include_background"],
        to_onehot_y=True,
        softmax=True,
        batch=opts["batch_dice"],
        weight=None if weights is None else torch.as_tensor(weights),
    )


def _monai_gdl(opts, k, weights):
    from monai.losses import GeneralizedDiceLoss

    return GeneralizedDiceLoss(
        to_onehot_y=True,
        softmax=opts["activation"] == "softmax",
        sigmoid=opts["activation"] == "sigmoid",
        w_type=opts["w_type"],
        batch=opts["batch_dice"],
    )


def _monai_tversky(opts, k, weights):
    from monai.losses import TverskyLoss

    return TverskyLoss(
        to_onehot_y=True,
        softmax=opts["activation"] == "softmax",
        sigmoid=opts["activation"] == "sigmoid",
        alpha=opts["alpha"],
        beta=opts["beta"],
    )


def _monai_focal(opts, k, weights):
    from monai.losses import FocalLoss

    return FocalLoss(
        include_background=opts["include_background"],
        to_onehot_y=True,
        gamma=opts["gamma"],
        alpha=opts["alpha"],
        use_softmax=opts["activation"] == "softmax",
    )


def _errors(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    abs_err = float(np.max(np.abs(a - b)))
    return abs_err, abs_err / max(float(np.max(np.abs(b))), 1e-30)


def run(dtype: str = "float32", seed: int = 0) -> list[dict]:
    """Computes the report rows (one per loss, option set, shape and mask)."""
    import torch

    from combo_jax import losses
    from combo_jax import reference as ref

    rng = np.random.default_rng(seed)
    shapes = [(2, 24, 24), (2, 10, 12, 8)]
    rows = []
    for (name, opts, monai_factory), spatial, k, masked in itertools.product(
        list(_cases()), shapes, (2, 6, 14), (False, True)
    ):
        opts = dict(opts)
        weighted = opts.pop("weighted", False)
        weights = rng.uniform(0.5, 2.0, k).tolist() if weighted else None
        if weights is not None:
            opts["class_weights"] = weights
        shape = (*spatial, k)
        logits = (rng.standard_normal(shape) * 2.0).astype(dtype)
        labels = rng.integers(0, k, spatial)
        mask = rng.random(spatial) > 0.25 if masked else None

        def jax_loss(x, opts=opts, name=name, labels=labels, mask=mask):
            return getattr(losses, name)(x, labels, where=mask, **opts)

        value, grad = jax.value_and_grad(jax_loss)(logits)

        def torch_value_and_grad(fn: Callable):
            xt = torch.tensor(np.moveaxis(logits, -1, 1), requires_grad=True)
            out = fn(xt)
            out.backward()
            return out.detach().numpy(), np.moveaxis(xt.grad.numpy(), 1, -1)

        labels_t = torch.tensor(labels)
        mask_t = None if mask is None else torch.tensor(mask)
        rv, rg = torch_value_and_grad(lambda xt: getattr(ref, name)(xt, labels_t, where=mask_t, **opts))
        row = {
            "loss": name,
            "options": _describe(opts, weighted),
            "shape": "x".join(map(str, shape)),
            "mask": masked,
            "value": float(value),
            "ref_value_abs": _errors(value, rv)[0],
            "ref_value_rel": _errors(value, rv)[1],
            "ref_grad_abs": _errors(grad, rg)[0],
            "ref_grad_rel": _errors(grad, rg)[1],
        }
        module = None if monai_factory is None or masked else monai_factory(opts, k, weights)
        if module is not None:
            mv, mg = torch_value_and_grad(lambda xt: module(xt, labels_t[:, None]))
            row.update(
                monai_value_rel=_errors(value, mv)[1],
                monai_grad_rel=_errors(grad, mg)[1],
            )
        rows.append(row)
    return rows


def _describe(opts: dict, weighted: bool) -> str:
    parts = []
    for key, val in opts.items():
        if key == "class_weights":
            continue
        if key == "activation":
            parts.append(str(val))
        elif isinstance(val, bool):
            if val:
                parts.append({"include_background": "bg", "batch_dice": "batch"}.get(key, key))
        elif val is not None:
            parts.append(f"{key}={val}")
    if weighted:
        parts.append("class_weights")
    return " ".join(parts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--x64", action="store_true", help="compare in float64")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--all-rows", action="store_true", help="print every row, not one summary per option set")
    args = parser.parse_args(argv)
    dtype = "float64" if args.x64 else "float32"
    if args.x64:
        jax.config.update("jax_enable_x64", True)
        import torch

        torch.set_default_dtype(torch.float64)
    tol = TOLERANCE[dtype]
    start = time.time()
    rows = run(dtype)

    # One line per (loss, options): the worst error over shapes, K and masks.
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        key = (row["loss"], row["options"]) if not args.all_rows else (row["loss"], row["options"], row["shape"], row["mask"])
        groups.setdefault(key, []).append(row)

    def worst(items, field):
        vals = [r[field] for r in items if field in r]
        return max(vals) if vals else None

    def fmt(v):
        return "      -" if v is None else f"{v:7.1e}"

    header = f"{'loss':<23} {'options':<44} {'n':>3}  {'ref val':>7} {'ref grad':>8}  {'MONAI val':>9} {'MONAI grad':>10}  ok"
    print(f"combo_jax parity report ({dtype}; relative errors, worst over 2D/3D, K in 2/6/14, with/without mask)")
    print(header)
    print("-" * len(header))
    failures = 0
    for key, items in groups.items():
        errs = [worst(items, f) for f in ("ref_value_rel", "ref_grad_rel", "monai_value_rel", "monai_grad_rel")]
        ok = all(e is None or e <= tol for e in errs)
        failures += not ok
        label = " ".join(str(k) for k in key[1:])
        print(
            f"{key[0]:<23} {label[:44]:<44} {len(items):>3}  {fmt(errs[0])} {fmt(errs[1]):>8}  "
            f"{fmt(errs[2]):>9} {fmt(errs[3]):>10}  {'yes' if ok else 'NO'}"
        )
    print("-" * len(header))
    print(
        f"{len(rows)} comparisons in {time.time() - start:.0f} s; tolerance rel <= {tol:g}; "
        f"{'all within tolerance' if not failures else f'{failures} option set(s) OUT OF TOLERANCE'}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"dtype": dtype, "tolerance": tol, "rows": rows}, f, indent=1)
        print(f"wrote {args.json}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
