"""Overlap metrics from confusion counts, as pure JAX functions (channels-last, hard labels).

``confusion_counts`` turns predicted and true label maps into per-class true-positive, false-positive and
false-negative voxel counts; every other metric is a function of those counts, so counts can be summed over
batches, devices and volumes before the ratios are taken (the only way to get exact dataset-level numbers).

Empty-organ conventions (an organ absent from both prediction and ground truth has TP = FP = FN = 0):
Dice, precision and recall are then 1 (the network agreed that the organ is absent), matching the
Combo loss's smoothed Dice of an absent, unpredicted organ. An organ present in only one of the two gets 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def confusion_counts(pred: jax.Array, labels: jax.Array, num_classes: int, *, where: jax.Array | None = None):
    """Per-class (TP, FP, FN) voxel counts of integer label maps.

    Args:
      pred: predicted class ids, shape (B, *spatial).
      labels: true class ids, same shape. Ids outside [0, num_classes) count for no class.
      num_classes: K.
      where: optional boolean mask of the voxels that count.

    Returns:
      Three int32 arrays of shape (K,): true positives, false positives, false negatives, summed over the batch.
    """
    if pred.shape != labels.shape:
        raise ValueError(f"confusion_counts: pred {pred.shape} and labels {labels.shape} must have the same shape")
    classes = jnp.arange(num_classes)
    p = pred[..., None] == classes
    t = labels[..., None] == classes
    if where is not None:
        keep = where[..., None]
        p, t = p & keep, t & keep
    axes = tuple(range(p.ndim - 1))
    tp = jnp.sum(p & t, axis=axes, dtype=jnp.int32)
    fp = jnp.sum(p & ~t, axis=axes, dtype=jnp.int32)
    fn = jnp.sum(~p & t, axis=axes, dtype=jnp.int32)
    return tp, fp, fn


def _ratio(num, den):
    num, den = jnp.asarray(num, jnp.float32), jnp.asarray(den, jnp.float32)
    return jnp.where(den > 0, num / jnp.maximum(den, 1.0), 1.0)


def dice_from_counts(tp, fp, fn):
    """2 TP / (2 TP + FP + FN) per class; 1 for a class absent from both prediction and truth."""
    return _ratio(2 * tp, 2 * tp + fp + fn)


def precision_from_counts(tp, fp, fn):
    """TP / (TP + FP); 1 when nothing was predicted and nothing was there, 0 when nothing was predicted but it was."""
    return jnp.where((tp + fp) > 0, _ratio(tp, tp + fp), jnp.where(fn > 0, 0.0, 1.0))


def recall_from_counts(tp, fp, fn):
    """TP / (TP + FN); 1 for a class absent from the truth and not predicted, 0 if absent but predicted."""
    return jnp.where((tp + fn) > 0, _ratio(tp, tp + fn), jnp.where(fp > 0, 0.0, 1.0))


def summarize(tp, fp, fn, *, first_organ: int = 1) -> dict:
    """Host-side per-organ table from accumulated counts (numpy scalars), and the mean foreground Dice."""
    dice = dice_from_counts(tp, fp, fn)
    precision = precision_from_counts(tp, fp, fn)
    recall = recall_from_counts(tp, fp, fn)
    organs = {}
    for k in range(first_organ, int(jnp.shape(tp)[0])):
        organs[k] = {
            "dice": float(dice[k]),
            "precision": float(precision[k]),
            "recall": float(recall[k]),
            "fp_voxels": int(fp[k]),
            "fn_voxels": int(fn[k]),
            "true_voxels": int(tp[k] + fn[k]),
        }
    return {"mean_fg_dice": float(jnp.mean(dice[first_organ:])), "organs": organs}
