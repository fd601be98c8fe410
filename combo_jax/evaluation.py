"""Validation: per-organ metrics of the validation split, and whole-volume prediction.

Overlap metrics (Dice, precision, recall, false-positive and false-negative volume) come from confusion counts
summed over every validation voxel: dataset-level numbers, not means of per-case ratios. Surface metrics (HD95,
mean surface distance, normalized surface Dice) are computed per case on the host at the data's voxel spacing,
while the device predicts the next case, and averaged over cases; a case where the organ is missing from exactly
one of prediction and truth has an infinite distance, which is left out of the mean and counted
(``*_inf_cases``).
"""

from __future__ import annotations

import numpy as np

from combo_jax import metrics
from combo_jax.data.datasets import Data, make_loader
from combo_jax.sharding import global_batch, to_host


def make_predictor(config, apply_fn, mesh):
    """The :class:`combo_jax.inference.DevicePredictor` of a real-volume config: ``config.eval.window`` and
    ``overlap``, batches of ``config.train.eval_batch_size`` windows split over every device of ``mesh``."""
    from combo_jax import inference

    return inference.DevicePredictor(apply_fn, window=tuple(config.eval.window), overlap=config.eval.overlap,
                                     batch_size=config.train.eval_batch_size, mesh=mesh)


def predict_labels(config, predictor, params, image: np.ndarray):
    """The label map of one whole volume ``(*spatial, C)``, pending on the device (``.get()`` waits for it).

    A 2D model on a 3D volume predicts it slice by slice along ``config.data.slice_axis``.
    """
    slice_axis = config.data.slice_axis if config.data.spatial_dims == 2 and image.ndim == 4 else None
    return predictor(params, image, slice_axis=slice_axis)


def _case_counts(pred: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """(TP, FP, FN) per class of one case, shape (3, K)."""
    return np.stack([np.asarray(c) for c in metrics.confusion_counts(pred, labels, k)]).astype(np.int64)


def evaluate(config, data: Data, params, steps: dict, sharding, *, keep_predictions: int = 0):
    """Per-organ metrics of the validation split (see the module docstring), and up to ``keep_predictions``
    (image, labels, prediction) triples for the report. ``steps``: ``"eval"`` (a jitted batch step, phantom) and
    ``"predict"`` (a :class:`combo_jax.inference.DevicePredictor`, real volumes)."""
    k = len(data.class_names)
    counts = np.zeros((3, k), np.int64)
    volumes_ml = np.zeros((2, k))  # false-positive and false-negative volume, each case at its own voxel size
    surface = []
    examples = []

    def add_case(image, labels, pred, spacing, case_counts):
        counts[:] += case_counts
        volumes_ml[:] += case_counts[1:] * float(np.prod(spacing)) / 1000.0
        surface.append(metrics.surface_metrics(pred, labels, k, spacing=spacing, tolerance_mm=config.eval.nsd_tolerance_mm))
        if len(examples) < keep_predictions:
            examples.append((image, labels, pred))

    if data.val_source is not None:
        loader = make_loader(data.val_source, batch_size=config.train.eval_batch_size, shuffle=False, seed=0,
                             num_epochs=1, worker_count=0)
        for local in loader:
            batch = global_batch(local, sharding)
            pred, case_counts = steps["eval"](params, batch)
            pred, labels, case_counts = to_host(pred), to_host(batch["labels"]), to_host(case_counts)
            images = to_host(batch["image"]) if len(examples) < keep_predictions else None  # only to keep examples
            for i in range(len(pred)):
                add_case(None if images is None else images[i], labels[i], pred[i], data.spacing, case_counts[i])
    else:
        # The next volume is predicted on the device while the host computes the surface metrics of this one.
        pending = None
        for volume in [*data.val_volumes, None]:
            launched = None if volume is None else (volume, predict_labels(config, steps["predict"], params, volume.image))
            if pending is not None:
                done, labels = pending[0], pending[1].get()
                add_case(done.image, done.labels, labels, done.spacing, _case_counts(labels, done.labels, k))
            pending = launched
    tp, fp, fn = counts
    summary = metrics.summarize(tp, fp, fn)
    for organ, row in summary["organs"].items():
        row["fp_ml"], row["fn_ml"] = float(volumes_ml[0, organ]), float(volumes_ml[1, organ])
        for key in ("hd95_mm", "msd_mm", "nsd"):
            row[key], row[f"{key}_inf_cases"] = metrics.mean_finite([case[organ][key] for case in surface])
    return summary, examples
