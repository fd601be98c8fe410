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


# ----------------------------------------------------------------------------------------------------------------
# On the device: the same weighted mean, accumulated where the model runs.


class DevicePredictor:
    """Sliding-window inference on the device: only the image goes in and only the label map comes back.

    The volume is tiled exactly as :func:`sliding_window_inference` tiles it (same starts, padding and Gaussian or
    constant weights), but the windows are cut out, run through the model and added into the weighted sum on the
    device, inside one jitted loop (``lax.scan`` over batches of ``batch_size`` windows). With a ``mesh``, every
    batch of windows is split over the mesh's ``"data"`` axis, so all devices share the work; the image and the sum
    are replicated. The label map is the argmax of the weighted sum (the division by the total weight, the same
    for every class of a voxel, cannot change it); ``logits=True`` returns the weighted mean as well.

    Args:
      apply_fn: ``apply_fn(params, windows)`` mapping ``(batch_size, *window, C)`` to logits
        ``(batch_size, *window, K)`` (a JAX function: it is traced into the loop).
      window, overlap, weighting: as :func:`sliding_window_inference`.
      batch_size: windows per model call; a multiple of the mesh's device count.
      mesh: a ``jax.sharding.Mesh`` with a ``"data"`` axis, or None (one device).

    Call ``predictor(params, image, slice_axis=None)`` with an image ``(*spatial, C)`` (numpy): a model of the
    image's spatial rank predicts it whole; a model of one rank fewer goes slice by slice along ``slice_axis``
    (windows of all slices share batches). Returns the int32 label map ``(*spatial)``, or ``(labels, logits)``.
    Programs are compiled once per padded image shape.
    """

    def __init__(self, apply_fn, *, window: Sequence[int], overlap: float = 0.5, batch_size: int = 4,
                 weighting: str = "gaussian", mesh=None):
        fn = "DevicePredictor"
        self.window = _check_window(window, fn)
        self.overlap = _check_overlap(overlap, fn)
        if not (isinstance(batch_size, (int, np.integer)) and not isinstance(batch_size, bool) and batch_size >= 1):
            raise ValueError(f"{fn}: batch_size must be an integer >= 1, got {batch_size!r}")
        if weighting not in _WEIGHTINGS:
            raise ValueError(f"{fn}: weighting must be one of {_WEIGHTINGS}, got {weighting!r}")
        devices = 1 if mesh is None else mesh.devices.size
        if batch_size % devices:
            raise ValueError(f"{fn}: batch_size={batch_size} must be a multiple of the mesh's {devices} devices")
        self.apply_fn, self.batch_size, self.mesh = apply_fn, int(batch_size), mesh
        self.weights = gaussian_importance(self.window) if weighting == "gaussian" else np.ones(self.window, np.float32)
        self._compiled: dict = {}

    def _program(self, padded_shape: tuple[int, ...], logits: bool):
        import jax
        import jax.numpy as jnp
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        key = (padded_shape, logits)
        if key in self._compiled:
            return self._compiled[key]
        window, weights, apply_fn = self.window, jnp.asarray(self.weights), self.apply_fn
        channels = padded_shape[-1]
        spread = None if self.mesh is None else NamedSharding(self.mesh, P("data"))

        def run(params, image, tasks, valid):
            def cut(task):
                start = (task[0], *task[1:], 0)
                return jax.lax.dynamic_slice(image, start, (1, *window, channels))[0]

            def step(acc, batch):
                task_batch, valid_batch = batch
                windows = jax.vmap(cut)(task_batch)
                if spread is not None:
                    windows = jax.lax.with_sharding_constraint(windows, spread)
                out = apply_fn(params, windows).astype(jnp.float32)
                out = out * weights[..., None] * valid_batch.reshape((-1,) + (1,) * (out.ndim - 1))

                def add(i, acc):
                    start = (task_batch[i, 0], *task_batch[i, 1:], 0)
                    size = (1, *window, out.shape[-1])
                    return jax.lax.dynamic_update_slice(acc, jax.lax.dynamic_slice(acc, start, size) + out[i][None], start)

                return jax.lax.fori_loop(0, out.shape[0], add, acc), None

            probe = jax.eval_shape(apply_fn, params, jax.ShapeDtypeStruct((1, *window, channels), image.dtype))
            acc = jnp.zeros((*image.shape[:-1], probe.shape[-1]), jnp.float32)
            acc, _ = jax.lax.scan(step, acc, (tasks, valid))
            labels = jnp.argmax(acc, axis=-1).astype(jnp.int32)
            return (labels, acc) if logits else labels

        from combo_jax.models.unet import compiler_options

        self._compiled[key] = jax.jit(run, compiler_options=compiler_options())
        return self._compiled[key]

    def __call__(self, params, image, *, slice_axis: int | None = None, logits: bool = False):
        import jax

        fn = "DevicePredictor"
        d = len(self.window)
        image = np.asarray(image)
        if image.ndim == d + 1:
            stack = image[None]
        elif image.ndim == d + 2 and slice_axis is not None:
            rank = d + 1
            if not (isinstance(slice_axis, (int, np.integer)) and -rank <= slice_axis < rank):
                raise ValueError(f"{fn}: slice_axis must be a spatial axis of the image, got {slice_axis!r}")
            slice_axis = int(slice_axis) % rank
            stack = np.moveaxis(image, slice_axis, 0)
        else:
            raise ValueError(f"{fn}: image must have shape (*spatial, C) with {d} spatial axes (or {d + 1} and a "
                             f"slice_axis, for a model of one rank fewer), got {image.shape}")
        if min(image.shape) < 1:
            raise ValueError(f"{fn}: image has an empty axis, shape {image.shape}")
        padded, crop = _pad_to_window(stack, self.window, "constant")
        starts = window_starts(padded.shape[1:-1], self.window, self.overlap)
        tasks = np.asarray([(n, *s) for n in range(padded.shape[0]) for s in starts], np.int32)
        count = len(tasks)
        total = -(-count // self.batch_size) * self.batch_size
        tasks = np.concatenate([tasks, np.repeat(tasks[:1], total - count, axis=0)])  # fillers weigh 0
        valid = (np.arange(total) < count).astype(np.float32)
        shape = (total // self.batch_size, self.batch_size)
        program = self._program(padded.shape, logits)
        inputs = [padded, tasks.reshape(*shape, d + 1), valid.reshape(shape)]
        if self.mesh is not None:
            from jax.sharding import NamedSharding
            from jax.sharding import PartitionSpec as P

            replicated = NamedSharding(self.mesh, P())
            inputs = [jax.make_array_from_callback(x.shape, replicated, lambda index, x=x: x[index]) for x in inputs]
        result = program(params, *inputs)
        return _PendingLabels(result, crop, slice_axis if image.ndim == d + 2 else None, logits, self.weights,
                              starts, padded.shape)


class _PendingLabels:
    """A label map still being computed on the device; ``get()`` waits for it (so the host can work meanwhile)."""

    def __init__(self, result, crop, slice_axis, logits, weights, starts, padded_shape):
        self.result, self.crop, self.slice_axis, self.logits = result, crop, slice_axis, logits
        self.weights, self.starts, self.padded_shape = weights, starts, padded_shape

    def _host(self, x):
        arr = np.asarray(x.addressable_data(0)) if hasattr(x, "addressable_data") else np.asarray(x)
        arr = arr[(slice(None), *self.crop)]
        if self.slice_axis is None:
            return arr[0]
        return np.moveaxis(arr, 0, self.slice_axis)

    def get(self):
        if not self.logits:
            return self._host(self.result)
        labels, acc = self.result
        total = np.zeros(self.padded_shape[1:-1], np.float32)
        for start in self.starts:
            total[tuple(slice(s, s + w) for s, w in zip(start, self.weights.shape))] += self.weights
        mean = np.asarray(acc.addressable_data(0)) / total[None, ..., None]
        return self._host(labels), self._host(mean)
