"""Validation: per-organ metrics of the validation split, and whole-volume prediction.

Overlap metrics (Dice, precision, recall, false-positive and false-negative volume) come from confusion counts
summed over every validation voxel: dataset-level numbers, not means of per-case ratios. Surface metrics (HD95,
mean surface distance, normalized surface Dice) are computed per case on the host at the data's voxel spacing,
after the device work for that case, and averaged over cases; a case where the organ is missing from exactly
one of prediction and truth has an infinite distance, which is left out of the mean and counted
(``*_inf_cases``).
"""

from __future__ import annotations

import numpy as np

from combo_jax import metrics
from combo_jax.data.datasets import Data, make_loader
from combo_jax.sharding import global_batch, to_host


def predict_volume(config, apply_fn, params, image: np.ndarray, sharding) -> np.ndarray:
    """Logits of one whole volume ``(*spatial, C)`` by sliding-window inference, windows split over the mesh.

    A 2D model on a 3D volume predicts it slice by slice along ``config.data.slice_axis``.
    """
    import jax

    from combo_jax import inference

    def run(windows: np.ndarray) -> np.ndarray:
        x = jax.make_array_from_callback(windows.shape, sharding, lambda index: windows[index])
        return to_host(apply_fn(params, x))

    options = dict(window=tuple(config.eval.window), overlap=config.eval.overlap, batch_size=config.train.eval_batch_size)
    if config.data.spatial_dims == 2 and image.ndim == 4:
        return inference.predict_slices(run, image, slice_axis=config.data.slice_axis, **options)
    return inference.sliding_window_inference(run, image, **options)


def _case_counts(pred: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """(TP, FP, FN) per class of one case, shape (3, K)."""
    return np.stack([np.asarray(c) for c in metrics.confusion_counts(pred, labels, k)]).astype(np.int64)


def evaluate(config, data: Data, params, steps: dict, sharding, *, keep_predictions: int = 0):
    """Per-organ metrics of the validation split (see the module docstring), and up to ``keep_predictions``
    (image, labels, prediction) triples for the report."""
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
        for volume in data.val_volumes:
            logits = predict_volume(config, steps["apply"], params, volume.image, sharding)
            pred = np.argmax(logits, axis=-1).astype(np.int32)
            add_case(volume.image, volume.labels, pred, volume.spacing, _case_counts(pred, volume.labels, k))
    tp, fp, fn = counts
    summary = metrics.summarize(tp, fp, fn)
    for organ, row in summary["organs"].items():
        row["fp_ml"], row["fn_ml"] = float(volumes_ml[0, organ]), float(volumes_ml[1, organ])
        for key in ("hd95_mm", "msd_mm", "nsd"):
            row[key], row[f"{key}_inf_cases"] = metrics.mean_finite([case[organ][key] for case in surface])
    return summary, examples
