"""Segmentation metrics of hard labels: overlap from confusion counts (pure JAX) and surface distances (host).

``confusion_counts`` turns predicted and true label maps into per-class true-positive, false-positive and
false-negative voxel counts; every other metric is a function of those counts, so counts can be summed over
batches, devices and volumes before the ratios are taken (the only way to get exact dataset-level numbers).

Empty-organ conventions (an organ absent from both prediction and ground truth has TP = FP = FN = 0):
Dice, precision and recall are then 1 (the network agreed that the organ is absent), matching the
Combo loss's smoothed Dice of an absent, unpredicted organ. An organ present in only one of the two gets 0.

Surface-distance metrics (host-side numpy/scipy, one volume at a time, distances in mm at a given voxel
spacing) come after the overlap metrics: ``surface_distances``, ``hausdorff95``, ``mean_surface_distance``,
``normalized_surface_dice``, the per-organ table ``surface_metrics`` and ``mean_finite`` for averaging over cases.

* **Boundary elements** (Nikolov et al. 2021; DeepMind's ``surface-distance`` package): the boundary of a mask
  lies on the grid of voxel corners. A corner whose 2x2 (2D) or 2x2x2 (3D) neighbourhood holds voxels inside and
  outside the mask is a boundary element; its size is the length (2D) or area (3D) of the marching-squares
  (marching-cubes) boundary at 0.5 inside that cell, at the voxel spacing (tables in ``_surface_tables.py``).
  Everything beyond the array counts as outside, so a mask touching the edge is closed there.
* **Distances** run from each boundary element of one mask to the nearest of the other (exact Euclidean,
  ``distance_transform_edt(..., sampling=spacing)``); a prediction equal to the truth has every distance 0.
  HD95, the mean surface distance and the normalized surface Dice weigh each element by its size, so an
  oblique boundary is not over- or under-counted on an anisotropic grid; they agree with the package's
  ``compute_robust_hausdorff``, ``compute_average_surface_distance`` (pooled) and
  ``compute_surface_dice_at_tolerance`` (tested to 1e-6).
* **Empty masks.** Both empty (the organ absent and not predicted): HD95 = 0, mean surface distance = 0,
  NSD = 1, agreement on absence as for Dice above. Exactly one empty: HD95 = inf, mean surface distance =
  inf, NSD = 0. (The package gives nan for both empty.)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage


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


# ---------------------------------------------------------------------------------------------------------------
# Surface-distance metrics: host-side numpy/scipy, one volume at a time.


def _check_spacing(spacing, ndim: int, fn: str) -> tuple[float, ...]:
    try:
        values = np.asarray(spacing, np.float64)
    except (TypeError, ValueError):
        values = None
    if values is None or values.shape != (ndim,) or not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise ValueError(
            f"{fn}: spacing must be {ndim} positive finite numbers (mm per voxel along each of the mask's {ndim} "
            f"axes), got {spacing!r}"
        )
    return tuple(float(v) for v in values)


def _check_masks(pred_mask, true_mask, spacing, fn: str):
    pred, true = np.asarray(pred_mask), np.asarray(true_mask)
    if pred.shape != true.shape:
        raise ValueError(f"{fn}: pred_mask {pred.shape} and true_mask {true.shape} must have the same shape")
    if pred.ndim == 0:
        raise ValueError(f"{fn}: pred_mask and true_mask need at least one axis, got 0-d arrays")
    return pred.astype(bool), true.astype(bool), _check_spacing(spacing, pred.ndim, fn)


def _crop_to_union(pred: np.ndarray, true: np.ndarray):
    """Both masks cut to the bounding box of their union, padded by one outside voxel on every side.

    Voxels outside the box are outside both masks, so the boundaries found in the padded box are the boundaries of
    the full masks (a mask touching the array's edge is closed there), and the distances between them the same.
    """
    union = pred | true
    box = []
    for axis in range(union.ndim):
        others = tuple(a for a in range(union.ndim) if a != axis)
        present = np.flatnonzero(union.any(axis=others) if others else union)
        box.append(slice(present[0], present[-1] + 1))
    return (np.pad(m[tuple(box)], 1) for m in (pred, true))


def _neighbour_codes(mask: np.ndarray) -> np.ndarray:
    """The code of every cell of the corner grid: bit i set when the i-th voxel of its 2^d neighbourhood is inside."""
    d = mask.ndim
    codes = np.zeros(tuple(s - 1 for s in mask.shape), np.int32)
    for i in range(2**d):
        offset = [(i >> (d - 1 - a)) & 1 for a in range(d)]
        window = tuple(slice(o, o + s - 1) for o, s in zip(offset, mask.shape))
        codes |= mask[window].astype(np.int32) << i
    return codes


@functools.lru_cache(maxsize=64)
def _code_areas(spacing: tuple[float, ...]) -> np.ndarray:
    """Area (3D, mm^2) or length (2D, mm) of the boundary inside a cell of each code, at ``spacing``."""
    from combo_jax import _surface_tables

    if len(spacing) == 2:
        s = np.asarray(spacing)
        return np.asarray([sum(float(np.linalg.norm(np.asarray(v) * s)) for v in segs) for segs in _surface_tables.SEGMENTS_2D])
    s0, s1, s2 = spacing
    scale = np.asarray([s1 * s2, s0 * s2, s0 * s1])
    return np.asarray([sum(float(np.linalg.norm(np.asarray(n) * scale)) for n in tris) for tris in _surface_tables.TRIANGLES_3D])


class SurfaceDistances(NamedTuple):
    """Boundary elements of two masks, each with its size and its distance to the other mask's boundary.

    ``pred_to_true[i]`` is the distance (mm) from the i-th boundary element of the prediction to the nearest one of
    the truth, ``pred_areas[i]`` its area (3D, mm^2) or length (2D, mm); likewise the other way round.
    """

    pred_to_true: np.ndarray
    pred_areas: np.ndarray
    true_to_pred: np.ndarray
    true_areas: np.ndarray


def surface_distances(pred_mask, true_mask, spacing: Sequence[float]) -> SurfaceDistances:
    """Boundary elements of a predicted and a true mask (2D or 3D) with their sizes and mutual distances, in mm.

    The boundary lies on the grid of voxel corners, as in Nikolov et al. (2021) and DeepMind's
    ``surface-distance`` package: a corner whose 2x2 (2x2x2) neighbourhood holds voxels inside and outside the mask
    is a boundary element, and its size is the length (area) of the marching-squares (marching-cubes) boundary at
    0.5 inside that cell, at the voxel spacing. Distances run from each element of one boundary to the nearest
    element of the other (exact Euclidean, ``distance_transform_edt`` with ``sampling=spacing``).

    Args:
      pred_mask: predicted mask, 2 or 3 axes (nonzero = inside).
      true_mask: true mask, same shape.
      spacing: voxel size in mm along each axis.

    Returns:
      :class:`SurfaceDistances`; a mask without voxels has no elements, and then every distance from the other's
      elements is ``inf``.
    """
    pred, true, spacing = _check_masks(pred_mask, true_mask, spacing, "surface_distances")
    if pred.ndim not in (2, 3):
        raise ValueError(f"surface_distances: masks must have 2 or 3 axes, got shape {pred.shape}")
    empty = np.zeros((0,), np.float64)
    if not (pred.any() or true.any()):
        return SurfaceDistances(empty, empty, empty, empty)
    pred, true = _crop_to_union(pred, true)
    areas = _code_areas(spacing)
    full = 2 ** (2 ** pred.ndim) - 1  # every voxel of the neighbourhood inside
    codes = [_neighbour_codes(m) for m in (pred, true)]
    borders = [(c != 0) & (c != full) for c in codes]

    def to_other(source, target):
        if not source.any():
            return empty
        if not target.any():
            return np.full((np.count_nonzero(source),), np.inf)
        return ndimage.distance_transform_edt(~target, sampling=spacing)[source]

    return SurfaceDistances(to_other(borders[0], borders[1]), areas[codes[0][borders[0]]],
                            to_other(borders[1], borders[0]), areas[codes[1][borders[1]]])


def _weighted_percentile(distances: np.ndarray, areas: np.ndarray, percentile: float) -> float:
    """The smallest distance whose elements, with all nearer ones, hold ``percentile`` % of the boundary's size."""
    order = np.argsort(distances, kind="stable")
    cumulative = np.cumsum(areas[order]) / np.sum(areas)
    index = min(int(np.searchsorted(cumulative, percentile / 100.0)), len(order) - 1)
    return float(distances[order][index])


def _hausdorff(sd: SurfaceDistances, percentile: float) -> float:
    if sd.pred_to_true.size == 0 and sd.true_to_pred.size == 0:
        return 0.0
    if sd.pred_to_true.size == 0 or sd.true_to_pred.size == 0:
        return math.inf
    return max(_weighted_percentile(sd.pred_to_true, sd.pred_areas, percentile),
               _weighted_percentile(sd.true_to_pred, sd.true_areas, percentile))


def _mean_distance(sd: SurfaceDistances) -> float:
    if sd.pred_to_true.size == 0 and sd.true_to_pred.size == 0:
        return 0.0
    if sd.pred_to_true.size == 0 or sd.true_to_pred.size == 0:
        return math.inf
    total = np.sum(sd.pred_areas) + np.sum(sd.true_areas)
    return float((np.sum(sd.pred_to_true * sd.pred_areas) + np.sum(sd.true_to_pred * sd.true_areas)) / total)


def _surface_dice(sd: SurfaceDistances, tolerance_mm: float) -> float:
    total = np.sum(sd.pred_areas) + np.sum(sd.true_areas)
    if sd.pred_to_true.size == 0 and sd.true_to_pred.size == 0:
        return 1.0
    within = np.sum(sd.pred_areas[sd.pred_to_true <= tolerance_mm]) + np.sum(sd.true_areas[sd.true_to_pred <= tolerance_mm])
    return float(within / total)


def _check_percentile(percentile, fn):
    if not 0 <= percentile <= 100:
        raise ValueError(f"{fn}: percentile must lie in [0, 100], got {percentile}")


def _check_tolerance(tolerance_mm, fn):
    if not (math.isfinite(tolerance_mm) and tolerance_mm >= 0):
        raise ValueError(f"{fn}: tolerance_mm must be a finite number >= 0, got {tolerance_mm}")


def hausdorff95(pred_mask, true_mask, spacing: Sequence[float], *, percentile: float = 95.0) -> float:
    """Robust Hausdorff distance in mm: the larger of the two directed 95th percentiles, weighted by area.

    .. math::
        HD_{95} = \\max\\big(P_{95}(d_{p \\to t}; a_p),\\; P_{95}(d_{t \\to p}; a_t)\\big)

    with :math:`P_q(d; a)` the smallest distance such that the boundary elements at or below it hold q % of the
    boundary's area (:func:`surface_distances`): DeepMind's ``compute_robust_hausdorff``. ``percentile=100`` gives
    the classical Hausdorff distance of the boundaries. Both masks empty: 0; exactly one empty: inf.
    """
    _check_percentile(percentile, "hausdorff95")
    return _hausdorff(surface_distances(pred_mask, true_mask, spacing), percentile)


def mean_surface_distance(pred_mask, true_mask, spacing: Sequence[float]) -> float:
    """Symmetric mean surface distance in mm: the area-weighted mean over the elements of both boundaries.

    .. math::
        MSD = \\frac{\\sum_{x} a_p(x)\\, d_{p \\to t}(x) + \\sum_{y} a_t(y)\\, d_{t \\to p}(y)}{\\sum_x a_p(x) + \\sum_y a_t(y)}

    (DeepMind's ``compute_average_surface_distance`` gives the two directed means; this pools them, weighted by
    each boundary's area.) Both masks empty: 0; exactly one empty: inf.
    """
    return _mean_distance(surface_distances(pred_mask, true_mask, spacing))


def normalized_surface_dice(pred_mask, true_mask, spacing: Sequence[float], tolerance_mm: float) -> float:
    """Normalized surface Dice (Nikolov et al. 2021): the share of both boundaries' area within `tolerance_mm` of
    the other boundary.

    .. math::
        NSD_\\tau = \\frac{\\sum_{x: d_{p \\to t}(x) \\le \\tau} a_p(x) + \\sum_{y: d_{t \\to p}(y) \\le \\tau} a_t(y)}
                      {\\sum_x a_p(x) + \\sum_y a_t(y)}

    Each boundary element counts with its area (:func:`surface_distances`), as in the paper and DeepMind's
    ``compute_surface_dice_at_tolerance``. Both masks empty: 1; exactly one empty: 0.
    """
    _check_tolerance(tolerance_mm, "normalized_surface_dice")
    return _surface_dice(surface_distances(pred_mask, true_mask, spacing), tolerance_mm)


def surface_metrics(
    pred,
    labels,
    num_classes: int,
    *,
    spacing: Sequence[float],
    tolerance_mm: float = 2.0,
    first_organ: int = 1,
) -> dict[int, dict[str, float]]:
    """HD95, mean surface distance and normalized surface Dice of every organ of one volume.

    Args:
      pred: predicted class ids of one volume, shape ``(*spatial)`` (no batch or channel axis).
      labels: true class ids, same shape.
      num_classes: K; organs are the classes ``first_organ .. K-1``.
      spacing: voxel size in mm per spatial axis.
      tolerance_mm: the surface Dice tolerance.
      first_organ: the first class reported (1 skips the background).

    Returns:
      ``{k: {"hd95_mm": ..., "msd_mm": ..., "nsd": ...}}`` with the module's empty-mask conventions; average
      over cases with :func:`mean_finite`.
    """
    pred, labels = np.asarray(pred), np.asarray(labels)
    if pred.shape != labels.shape:
        raise ValueError(f"surface_metrics: pred {pred.shape} and labels {labels.shape} must have the same shape")
    if pred.ndim == 0:
        raise ValueError("surface_metrics: pred and labels need at least one spatial axis, got 0-d arrays")
    if not 0 <= first_organ <= num_classes:
        raise ValueError(f"surface_metrics: first_organ must lie in [0, num_classes={num_classes}], got {first_organ}")
    spacing = _check_spacing(spacing, pred.ndim, "surface_metrics")
    _check_tolerance(tolerance_mm, "surface_metrics")
    table = {}
    for k in range(first_organ, num_classes):
        sd = surface_distances(pred == k, labels == k, spacing)
        table[k] = {"hd95_mm": _hausdorff(sd, 95.0), "msd_mm": _mean_distance(sd), "nsd": _surface_dice(sd, tolerance_mm)}
    return table


def mean_finite(values) -> tuple[float, int]:
    """Mean over cases of a surface metric, leaving out the infinite ones.

    Args:
      values: per-case values (finite or ``+inf``, as the functions above return).

    Returns:
      ``(mean, inf_cases)``: the mean of the finite values and how many values were left out. The mean is
      ``inf`` when every value is infinite and ``nan`` when `values` is empty.
    """
    values = np.asarray(values, np.float64).reshape(-1)
    if np.any(np.isnan(values)):
        raise ValueError(f"mean_finite: values must not contain nan, got {values.tolist()}")
    finite = values[np.isfinite(values)]
    inf_cases = int(values.size - finite.size)
    if finite.size:
        return float(finite.mean()), inf_cases
    return (math.inf if inf_cases else math.nan), inf_cases
