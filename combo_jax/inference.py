"""Sliding-window inference: logits of a whole volume from a model that sees fixed-size windows.

Layout is channels-last and one volume at a time, on the host: an image ``(*spatial, C)`` in, logits
``(*spatial, K)`` float32 out. The model is any ``apply_fn`` mapping a batch of windows ``(batch_size, *window,
C)`` to logits ``(batch_size, *window, K)``; every call gets exactly ``batch_size`` windows (the last batch is
filled up with zero windows whose outputs are dropped), so a jitted ``apply_fn`` compiles once.

The volume is tiled by windows that overlap by at least the requested fraction (:func:`window_starts`), and
each voxel's logits are the weighted mean over the windows that cover it,

.. math::
    y(v) = \\frac{\\sum_{w \\ni v} g(v - s_w)\\, f_w(v - s_w)}{\\sum_{w \\ni v} g(v - s_w)},

with :math:`s_w` the start of window :math:`w`, :math:`f_w` the model's logits on it and :math:`g` the importance
map: a Gaussian centred on the window (:func:`gaussian_importance`, as nnU-Net, so that the less reliable window
borders count less) or a constant. For a model that acts voxel by voxel, the result is exactly (up to float
rounding) the model applied to the whole volume.

Along an axis where the volume is smaller than the window, the image is padded (zeros by default, or its edge
values) on both sides, half before and half after, up to the window size, and the logits are cropped back.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from itertools import product

import numpy as np

# Lower bound of the Gaussian importance map: far from the centre exp(-x^2 / 2) underflows, and a voxel that only
# window corners cover must still get a positive total weight.
_MIN_WEIGHT = 1e-6

_WEIGHTINGS = ("gaussian", "constant")
_PAD_MODES = ("constant", "edge")


def _check_window(window, fn: str, *, rank: int | None = None) -> tuple[int, ...]:
    try:
        sizes = tuple(window)
    except TypeError:
        sizes = None
    if (
        not sizes
        or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in sizes)
        or min(sizes) < 1
    ):
        raise ValueError(f"{fn}: window must be a non-empty sequence of positive integers, got {window!r}")
    if rank is not None and len(sizes) != rank:
        raise ValueError(f"{fn}: window {sizes} has {len(sizes)} axes but the image has {rank} spatial axes")
    return tuple(int(s) for s in sizes)


def _check_overlap(overlap, fn: str) -> float:
    if not (isinstance(overlap, (int, float, np.floating)) and 0 <= overlap < 1):
        raise ValueError(f"{fn}: overlap must be a fraction in [0, 1), got {overlap!r}")
    return float(overlap)


def gaussian_importance(window: Sequence[int], *, sigma_scale: float = 0.125) -> np.ndarray:
    """Window-shaped weights, largest at the centre.

    .. math::
        g(i) = \\max\\Big(\\epsilon,\\; \\prod_a \\exp\\Big(-\\frac{(i_a - c_a)^2}{2 \\sigma_a^2}\\Big) / Z\\Big),
        \\qquad c_a = \\frac{w_a - 1}{2},\\quad \\sigma_a = w_a \\cdot \\text{sigma\\_scale}

    :math:`Z` scales the maximum to 1 (the centre voxel, or the central two per axis of even size) and
    :math:`\\epsilon = 10^{-6}` keeps every weight positive. nnU-Net uses the same sigma (1/8 of the window) with the
    centre at ``w // 2``; centring at ``(w - 1) / 2`` keeps the map symmetric for even sizes.

    Args:
      window: the window's spatial shape.
      sigma_scale: the Gaussian's standard deviation as a fraction of the window size, > 0.

    Returns:
      float32 array of shape ``window``.
    """
    window = _check_window(window, "gaussian_importance")
    if not (isinstance(sigma_scale, (int, float, np.floating)) and math.isfinite(sigma_scale) and sigma_scale > 0):
        raise ValueError(f"gaussian_importance: sigma_scale must be a positive finite number, got {sigma_scale!r}")
    weights = np.ones((), np.float64)
    for size in window:
        offset = np.arange(size) - (size - 1) / 2
        weights = np.multiply.outer(weights, np.exp(-0.5 * (offset / (size * sigma_scale)) ** 2))
    weights /= weights.max()
    return np.maximum(weights, _MIN_WEIGHT).astype(np.float32)


def window_starts(shape: Sequence[int], window: Sequence[int], overlap: float) -> list[tuple[int, ...]]:
    """Start indices of windows that tile `shape` with at least `overlap` of a window shared by neighbours.

    Per axis of size ``n`` and window ``w < n``: the largest allowed step is ``m = max(1, floor(w (1 - overlap)))``,
    the number of windows ``k = ceil((n - w) / m) + 1``, and the starts ``floor(i (n - w) / (k - 1))`` for
    ``i = 0 .. k-1``. They begin at 0, end flush with the volume (the last window covers the last voxel), and
    consecutive starts differ by at most ``m``, so neighbours overlap by ``w - m >= overlap * w`` voxels (or by
    ``w - 1`` when ``w (1 - overlap) < 1``: a window moves by at least one voxel). Along an
    axis with ``w >= n`` there is a single start, 0: the window overhangs the volume, which the caller pads up
    to the window (:func:`sliding_window_inference` does, on both sides).

    Args:
      shape: spatial shape of the volume.
      window: spatial shape of the window, same length.
      overlap: the least fraction of a window that neighbouring windows share, in [0, 1).

    Returns:
      Every combination of the per-axis starts, as tuples, in C order (last axis fastest).
    """
    window = _check_window(window, "window_starts", rank=len(tuple(shape)))
    shape = tuple(int(s) for s in shape)
    if min(shape) < 1:
        raise ValueError(f"window_starts: shape must hold positive sizes, got {shape}")
    overlap = _check_overlap(overlap, "window_starts")
    per_axis = []
    for size, w in zip(shape, window):
        if w >= size:
            per_axis.append([0])
            continue
        max_step = max(1, math.floor(w * (1 - overlap)))
        count = -(-(size - w) // max_step) + 1
        per_axis.append([i * (size - w) // (count - 1) for i in range(count)])
    return list(product(*per_axis))


def _pad_to_window(images: np.ndarray, window: tuple[int, ...], pad_mode: str):
    """(N, *spatial, C) padded on both sides of each spatial axis up to the window; the crop that undoes it."""
    spatial = images.shape[1:-1]
    pads = [((w - s) // 2, (w - s) - (w - s) // 2) if w > s else (0, 0) for s, w in zip(spatial, window)]
    crop = tuple(slice(before, before + s) for (before, _), s in zip(pads, spatial))
    if any(p != (0, 0) for p in pads):
        images = np.pad(images, [(0, 0), *pads, (0, 0)], mode=pad_mode)
    return images, crop


def _windowed_logits(
    apply_fn, images: np.ndarray, *, window, overlap, batch_size, weighting, num_classes, pad_mode, fn: str
) -> np.ndarray:
    """The weighted-mean logits of every image of a stack (N, *spatial, C) -> (N, *spatial, K)."""
    overlap = _check_overlap(overlap, fn)
    if not (isinstance(batch_size, (int, np.integer)) and not isinstance(batch_size, bool) and batch_size >= 1):
        raise ValueError(f"{fn}: batch_size must be an integer >= 1, got {batch_size!r}")
    if weighting not in _WEIGHTINGS:
        raise ValueError(f"{fn}: weighting must be one of {_WEIGHTINGS}, got {weighting!r}")
    if pad_mode not in _PAD_MODES:
        raise ValueError(f"{fn}: pad_mode must be one of {_PAD_MODES}, got {pad_mode!r}")
    if num_classes is not None and not (isinstance(num_classes, (int, np.integer)) and num_classes >= 1):
        raise ValueError(f"{fn}: num_classes must be None or an integer >= 1, got {num_classes!r}")

    images, crop = _pad_to_window(images, window, pad_mode)
    count, padded, channels = images.shape[0], images.shape[1:-1], images.shape[-1]
    starts = window_starts(padded, window, overlap)
    weights = gaussian_importance(window) if weighting == "gaussian" else np.ones(window, np.float32)

    def region(start):
        return tuple(slice(s, s + w) for s, w in zip(start, window))

    # The weight total of a voxel does not depend on the image, so it is summed once.
    total = np.zeros(padded, np.float32)
    for start in starts:
        total[region(start)] += weights
    tasks = [(n, start) for n in range(count) for start in starts]
    sums = None

    def accumulate(chunk, logits):
        nonlocal sums
        logits = np.asarray(logits)
        expected = (batch_size, *window)
        if logits.shape[:-1] != expected or (num_classes is not None and logits.shape[-1] != num_classes):
            want = f"({batch_size}, {', '.join(map(str, window))}, {num_classes if num_classes else 'K'})"
            raise ValueError(f"{fn}: apply_fn returned logits of shape {logits.shape} for a batch of windows of shape "
                             f"{(batch_size, *window, channels)}; expected {want}")
        if sums is None:
            sums = np.zeros((count, *padded, logits.shape[-1]), np.float32)
        for slot, (n, start) in enumerate(chunk):
            sums[(n, *region(start))] += logits[slot] * weights[..., None]

    # Dispatch the next batch before reading back the previous one, so an asynchronous apply_fn (a jitted JAX
    # function) computes while the host accumulates.
    pending = None
    for first in range(0, len(tasks), batch_size):
        chunk = tasks[first : first + batch_size]
        batch = np.zeros((batch_size, *window, channels), images.dtype)  # a fresh buffer: apply_fn may alias it
        for slot, (n, start) in enumerate(chunk):
            batch[slot] = images[(n, *region(start))]
        logits = apply_fn(batch)
        if pending is not None:
            accumulate(*pending)
        pending = (chunk, logits)
    accumulate(*pending)

    sums /= total[None, ..., None]
    return sums[(slice(None), *crop)]


def _as_image(image, name: str, spatial_rank: int, fn: str) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != spatial_rank + 1:
        raise ValueError(f"{fn}: {name} must have shape (*spatial, C) with {spatial_rank} spatial axes (one per "
                         f"window axis) and a channel axis, got shape {image.shape}")
    if min(image.shape) < 1:
        raise ValueError(f"{fn}: {name} has an empty axis, shape {image.shape}")
    return image


def sliding_window_inference(
    apply_fn: Callable[[np.ndarray], np.ndarray],
    image,
    *,
    window: Sequence[int],
    overlap: float = 0.5,
    batch_size: int = 4,
    weighting: str = "gaussian",
    num_classes: int | None = None,
    pad_mode: str = "constant",
) -> np.ndarray:
    """Logits of one whole volume from a model applied to overlapping windows (see the module docstring).

    Args:
      apply_fn: maps windows ``(batch_size, *window, C)`` (a numpy array of the image's dtype) to logits
        ``(batch_size, *window, K)`` (numpy or JAX). It is always called with exactly ``batch_size`` windows.
      image: one volume, channels-last ``(*spatial, C)``, ``len(spatial) == len(window)``.
      window: the window's spatial shape (what the model was trained on; a U-Net needs multiples of its divisor).
      overlap: least fraction of a window shared by neighbouring windows, in [0, 1); 0.5 as MONAI and nnU-Net.
      batch_size: windows per ``apply_fn`` call, >= 1.
      weighting: ``"gaussian"`` (:func:`gaussian_importance`) or ``"constant"`` (plain mean).
      num_classes: K, checked against the logits when given; inferred from them when None.
      pad_mode: how an image smaller than the window is padded: ``"constant"`` (zeros) or ``"edge"`` (repeat the
        border values), on both sides of the axis.

    Returns:
      float32 logits ``(*spatial, K)``.
    """
    fn = "sliding_window_inference"
    window = _check_window(window, fn)
    image = _as_image(image, "image", len(window), fn)
    logits = _windowed_logits(apply_fn, image[None], window=window, overlap=overlap, batch_size=batch_size,
                              weighting=weighting, num_classes=num_classes, pad_mode=pad_mode, fn=fn)
    return logits[0]


def predict_slices(
    apply_fn: Callable[[np.ndarray], np.ndarray],
    volume,
    *,
    slice_axis: int,
    window: Sequence[int],
    overlap: float = 0.5,
    batch_size: int = 4,
    weighting: str = "gaussian",
    num_classes: int | None = None,
    pad_mode: str = "constant",
) -> np.ndarray:
    """Logits of a volume from a model of one spatial rank fewer, applied slice by slice (a 2D model on 3D).

    Every slice along `slice_axis` gets :func:`sliding_window_inference` with the same options; windows of
    different slices share ``apply_fn`` batches, so each call is full whatever the slice size.

    Args:
      apply_fn: maps ``(batch_size, *window, C)`` to ``(batch_size, *window, K)``, e.g. a 2D U-Net.
      volume: channels-last ``(*spatial, C)`` with ``len(spatial) == len(window) + 1``, e.g. ``(D, H, W, C)``.
      slice_axis: the spatial axis the slices are taken across (negative counts from the last spatial axis);
        the window covers the remaining spatial axes in their order.
      window, overlap, batch_size, weighting, num_classes, pad_mode: as :func:`sliding_window_inference`.

    Returns:
      float32 logits ``(*spatial, K)`` of the whole volume.
    """
    fn = "predict_slices"
    window = _check_window(window, fn)
    volume = _as_image(volume, "volume", len(window) + 1, fn)
    rank = len(window) + 1
    if not (isinstance(slice_axis, (int, np.integer)) and -rank <= slice_axis < rank):
        raise ValueError(f"{fn}: slice_axis must be a spatial axis of the volume, in [{-rank}, {rank}), got "
                         f"{slice_axis!r} for volume shape {volume.shape}")
    slice_axis = int(slice_axis) % rank
    slices = np.moveaxis(volume, slice_axis, 0)
    logits = _windowed_logits(apply_fn, slices, window=window, overlap=overlap, batch_size=batch_size,
                              weighting=weighting, num_classes=num_classes, pad_mode=pad_mode, fn=fn)
    return np.moveaxis(logits, 0, slice_axis)
