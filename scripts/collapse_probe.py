"""Probe a phantom training run's checkpoints: which loss term pushes where.

For every checkpoint kept under WORKDIR/checkpoints/latest, on a fixed set of training cases:
  - per organ: predicted and true voxel counts, false positives (argmax = k, truth = background);
  - the gradient of each Combo term with respect to the organ's logit z_k, averaged over
    (a) painted voxels (argmax = k, truth = background): positive = the term pushes z_k down there,
    (b) the organ's true voxels: negative = the term pushes z_k up there;
    terms: alpha * L_wce(beta) over organ channels (mean over N |C|), -(1 - alpha) mean Dice over organs,
    and, for comparison, -(1 - alpha) mean Dice over all channels (background included) and the plain
    softmax cross-entropy (mean over voxels);
  - the norm of each term's gradient with respect to the parameters.

The table it prints (gradients w.r.t. the logits, averaged over the voxels named) lists, per kept checkpoint,
the organs that are painted (false positives over 10x the true volume) or found on under 10% of their voxels.
2D phantom runs only.

    python scripts/collapse_probe.py WORKDIR [--cases 32] [--out probe.json]
"""

import argparse
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from combo_jax.config import read_saved_config
from combo_jax.data import phantom
from combo_jax.train_state import init_state


def terms(z, labels, *, alpha, beta, smooth=1.0):
    k = z.shape[-1]
    t = jax.nn.one_hot(labels, k)
    logp = jax.nn.log_softmax(z)
    p = jnp.exp(logp)
    # log(1 - p_k) as the log-sum-exp of the other channels
    others = jnp.where(jnp.eye(k, dtype=bool)[None, None, None], -jnp.inf, z[..., None, :])
    log1m = jax.nn.logsumexp(others, axis=-1) - jax.nn.logsumexp(z, axis=-1, keepdims=True)
    n = labels.size
    ce = -(beta * t * logp + (1 - beta) * (1 - t) * log1m)[..., 1:].sum() / (n * (k - 1))
    axes = (1, 2)
    inter, psum, tsum = (p * t).sum(axes), p.sum(axes), t.sum(axes)
    dice = (2 * inter + smooth) / (psum + tsum + smooth)  # (B, K)
    plain_ce = -(t * logp).sum() / n
    return {
        "wce": alpha * ce,
        "dice_fg": -(1 - alpha) * dice[:, 1:].mean(),
        "dice_all": -(1 - alpha) * dice.mean(),
        "plain_ce": plain_ce,
        "soft_dice": dice,
    }


def _lookup(tree, path):
    """The leaf of a restored nested dict at a pytree key path (dict keys and attribute names alike)."""
    for key in path:
        name = getattr(key, "key", getattr(key, "name", getattr(key, "idx", None)))
        tree = tree[name] if name in tree else tree[str(name)]
    return jnp.asarray(tree)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("workdir")
    ap.add_argument("--cases", type=int, default=32)
    ap.add_argument("--first-case", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    saved = read_saved_config(args.workdir)
    saved.get("model", {}).pop("num_classes", None)  # written by older versions; now derived from the data
    config = ml_collections.ConfigDict(saved)
    alpha = float(config.loss.get("alpha", 0.5))
    beta = float(config.loss.get("beta", 0.5))
    cases = [phantom.make_case(config.data.seed, i, tuple(config.data.shape))
             for i in range(args.first_case, args.first_case + args.cases)]
    images = jnp.asarray(np.stack([c[0] for c in cases]))
    labels = jnp.asarray(np.stack([c[1] for c in cases]))
    graphdef, state, _, _ = init_state(config)
    manager = ocp.CheckpointManager(os.path.join(os.path.abspath(args.workdir), "checkpoints", "latest"),
                                    options=ocp.CheckpointManagerOptions(read_only=True))
    # Only the parameters are read (by their paths), so checkpoints of other versions of the training state load.
    param_paths, param_def = jax.tree_util.tree_flatten_with_path(state.params)
    names = phantom.CLASS_NAMES

    @jax.jit
    def probe(params):
        def logits_of(params):
            return nnx.merge(graphdef, params)(images).astype(jnp.float32)

        z = logits_of(params)
        out = {}
        for name in ("wce", "dice_fg", "dice_all", "plain_ce"):
            f = lambda zz, name=name: terms(zz, labels, alpha=alpha, beta=beta)[name]
            out[f"dz_{name}"] = jax.grad(f)(z)
            g = jax.grad(lambda pp, name=name: terms(logits_of(pp), labels, alpha=alpha, beta=beta)[name])(params)
            out[f"pnorm_{name}"] = optax.tree.norm(g)
            out[f"pgrad_{name}"] = g
        tv = terms(z, labels, alpha=alpha, beta=beta)
        out["values"] = {k: tv[k] for k in ("wce", "dice_fg", "dice_all", "plain_ce")}
        out["soft_dice"] = tv["soft_dice"]
        out["z"] = z
        return out

    rows = []
    for step in sorted(manager.all_steps()):
        raw = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]["params"]
        params = jax.tree_util.tree_unflatten(param_def, [_lookup(raw, path) for path, _ in param_paths])
        out = probe(params)
        z = np.asarray(out["z"])
        pred = z.argmax(-1)
        lab = np.asarray(labels)
        row = {"step": int(step), "values": {k: float(v) for k, v in out["values"].items()},
               "param_grad_norm": {k: float(out[f"pnorm_{k}"]) for k in ("wce", "dice_fg", "dice_all", "plain_ce")}}
        gw, gd = out["pgrad_wce"], out["pgrad_dice_fg"]
        dot = sum(float(jnp.vdot(a, b)) for a, b in zip(jax.tree.leaves(gw), jax.tree.leaves(gd)))
        row["cos_wce_dice"] = dot / (row["param_grad_norm"]["wce"] * row["param_grad_norm"]["dice_fg"] + 1e-30)
        organs = {}
        for k in range(1, len(names)):
            painted = (pred == k) & (lab == 0)
            true = lab == k
            o = {"true": int(true.sum()), "pred": int((pred == k).sum()), "fp": int(painted.sum()),
                 "tp": int(((pred == k) & true).sum()),
                 "soft_dice_mean": float(np.asarray(out["soft_dice"])[:, k].mean())}
            probs = np.asarray(jax.nn.softmax(out["z"]))
            o["painted_p_organ"] = float(probs[..., k][painted].mean()) if painted.any() else None
            o["painted_p_background"] = float(probs[..., 0][painted].mean()) if painted.any() else None
            o["true_p_organ"] = float(probs[..., k][true].mean()) if true.any() else None
            for name in ("wce", "dice_fg", "dice_all", "plain_ce"):
                g = np.asarray(out[f"dz_{name}"])[..., k]
                o[f"painted_dz_{name}"] = float(g[painted].mean()) if painted.any() else None
                o[f"true_dz_{name}"] = float(g[true].mean()) if true.any() else None
                o[f"painted_sum_dz_{name}"] = float(g[painted].sum())
                o[f"true_sum_dz_{name}"] = float(g[true].sum())
            organs[names[k]] = o
        row["organs"] = organs
        rows.append(row)
        print(f"step {row['step']}: loss terms {row['values']}, parameter-gradient norms {row['param_grad_norm']}, "
              f"cosine(wce, Dice) {row['cos_wce_dice']:+.2f}", flush=True)
    print()
    print("| step | organ | painted voxels | p_organ / p_background there | wce | Dice (organs) | net | Dice (all channels) | "
          "plain CE | p_organ on the organ | wce | Dice (organs) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        for name in names[1:]:
            o = row["organs"][name]
            if o["fp"] <= 10 * o["true"] and o["tp"] >= 0.1 * o["true"]:
                continue  # neither painted nor missed: nothing to explain
            if o["fp"]:
                cells = [f"{o['fp']}", f"{o['painted_p_organ']:.2f} / {o['painted_p_background']:.3f}",
                         *(f"{o[f'painted_dz_{t}']:+.1e}" for t in ("wce", "dice_fg")),
                         f"{o['painted_dz_wce'] + o['painted_dz_dice_fg']:+.1e}",
                         *(f"{o[f'painted_dz_{t}']:+.1e}" for t in ("dice_all", "plain_ce"))]
            else:
                cells = ["0", "-", "-", "-", "-", "-", "-"]
            cells += [f"{o['true_p_organ']:.3f}", f"{o['true_dz_wce']:+.1e}", f"{o['true_dz_dice_fg']:+.1e}"]
            print(f"| {row['step']} | {name} | " + " | ".join(cells) + " |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
