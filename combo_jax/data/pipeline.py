"""Training patches from preprocessed volumes: a grain data source, a foreground-oversampling patch sampler and
augmentation, deterministic per seed.

Layout: records and patches are channels-last, ``image`` float32 ``(*spatial, C)`` and ``labels`` int32
``(*spatial)``, in the volumes' own axis order (2D or 3D volumes; 2D patches may be slices of 3D volumes).

    source = VolumeSource(volumes, num_records=256)          # volumes: nifti.load_dataset(...)
    operations = [PatchSampler((96, 96, 32)), Augment(flip_axes=(0, 1)), grain.transforms.Batch(2)]
    sampler = grain.samplers.IndexSampler(len(source), shuffle=True, seed=0, num_epochs=None)
    loader = grain.DataLoader(data_source=source, sampler=sampler, operations=operations, worker_count=0)

Randomness comes only from the ``numpy.random.Generator`` that grain hands to each record's
``RandomMap.random_map``: grain 0.2's ``IndexSampler`` builds it as ``Philox(key=seed + index)`` for the
record at position ``index`` of the sampler's (shuffled, repeated) sequence. The transforms draw from it in a
fixed order (sampler first, then augmentation), so a seed fixes every record's patch, whatever the worker
count; how records are grouped into batches does depend on grain's worker count (each worker batches its own
records). A sampler without a seed gives no generator, which the transforms reject.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import grain
import numpy as np


def _record_rng(rng, who: str) -> np.random.Generator:
    if rng is None:
        raise ValueError(
            f"{who}: grain passed no random generator; give the IndexSampler a seed (seed=...) so every record "
            "gets one"
        )
    return rng


class _Mapped:
    """A memory-mapped ``.npy`` array by its file: opened on each use, so the pages a crop touched are released with
    it (they stay in the page cache, not in the process), and pickled as the path (grain workers open it again)."""

    def __init__(self, array: np.memmap):
        self.filename, self.shape, self.dtype, self.offset = str(array.filename), array.shape, array.dtype, array.offset
        self.order = "F" if array.flags.f_contiguous and not array.flags.c_contiguous else "C"

    def open(self) -> np.ndarray:
        # np.memmap, not np.load: no .npy header to parse (CPython 3.11's parser is not safe in grain's reader
        # threads: concurrent ast.literal_eval calls can fail with "AST constructor recursion depth mismatch").
        return np.memmap(self.filename, self.dtype, mode="r", offset=self.offset, shape=self.shape, order=self.order)


def _opened(array):
    return array.open() if isinstance(array, _Mapped) else array


def _whole_file(array) -> bool:
    """Whether ``array`` is a memory-mapped ``.npy`` file as a whole (not a view or a copy of one)."""
    if not isinstance(array, np.memmap) or not array.filename or not str(array.filename).endswith(".npy"):
        return False
    try:
        mapped = np.load(array.filename, mmap_mode="r")
    except (OSError, ValueError):
        return False
    return mapped.shape == array.shape and mapped.dtype == array.dtype and array.offset == mapped.offset


class VolumeSource:
    """A grain random-access source over preprocessed volumes.

    ``volumes``: objects with ``image`` ``(*spatial, C)``, ``labels`` ``(*spatial)`` (non-negative integers, not
    None) and optionally ``name`` and ``foreground`` (:func:`combo_jax.data.nifti.foreground_index`; e.g.
    :class:`combo_jax.data.nifti.Volume`), 2D or 3D, all with the same number of channels.

    ``num_records``: the source's length (default: one record per volume); record ``i`` is volume
    ``i % len(volumes)``, so a sampler over ``num_records`` records visits every volume equally often and an
    epoch can hold many patches of a few volumes.

    For the patch sampler, each volume's foreground voxels are indexed: per class present, at most
    ``max_foreground_voxels`` coordinates chosen at random (fixed seed) among its voxels, plus the class's true
    voxel count; a volume that brings its ``foreground`` index (a cached one does) is not read for it.
    Memory-mapped volumes (the cache's, ``np.load(..., mmap_mode="r")``) are kept by file and opened per record,
    so a process, grain workers included, holds only the patches it draws: the source pickles into each worker as
    file names and small indexes. In-memory volumes are held (shared, not copied) and pickled whole.

    Records are dicts: ``image``, ``labels``, ``classes`` (int32 ``(P,)``, the foreground classes present),
    ``class_voxels`` (a tuple of ``P`` int32 arrays ``(n_k, ndim)`` of coordinates) and ``class_counts``
    (int64 ``(P,)``, voxels of each class before subsampling).
    """

    def __init__(self, volumes: Sequence, *, num_records: int | None = None, max_foreground_voxels: int = 10_000):
        from combo_jax.data.nifti import foreground_index

        if len(volumes) == 0:
            raise ValueError("VolumeSource: no volumes")
        if max_foreground_voxels < 1:
            raise ValueError(f"VolumeSource: max_foreground_voxels must be positive, got {max_foreground_voxels}")
        self._records = []
        channels = None
        for i, volume in enumerate(volumes):
            name = getattr(volume, "name", None) or f"volume {i}"
            image, labels = volume.image, volume.labels
            if labels is None:
                raise ValueError(f"VolumeSource: {name} has no labels (a prediction-only case cannot be trained on)")
            image = image if _whole_file(image) else np.asarray(image)
            labels = labels if _whole_file(labels) else np.asarray(labels)
            if labels.ndim not in (2, 3) or image.shape[:-1] != labels.shape:
                raise ValueError(
                    f"VolumeSource: {name}: image {image.shape} must be (*spatial, C) over labels {labels.shape} "
                    "with 2 or 3 spatial axes"
                )
            if channels is not None and image.shape[-1] != channels:
                raise ValueError(f"VolumeSource: {name} has {image.shape[-1]} channels, the first volume {channels}")
            channels = image.shape[-1]
            if labels.dtype.kind not in "iu":
                raise ValueError(f"VolumeSource: {name}: labels must be non-negative integers, got dtype {labels.dtype}")
            index = getattr(volume, "foreground", None)
            if index is None:
                if labels.size and labels.min() < 0:
                    raise ValueError(f"VolumeSource: {name}: labels must be non-negative integers, found {labels.min()}")
                index = foreground_index(labels, max_foreground_voxels, seed=i)
            self._records.append({
                "image": _Mapped(image) if _whole_file(image) else np.asarray(image, np.float32),
                "labels": _Mapped(labels) if _whole_file(labels) else np.asarray(labels, np.int32),
                "name": name, "shape": labels.shape, **index})
        self.num_records = len(self._records) if num_records is None else int(num_records)
        if self.num_records < 1:
            raise ValueError(f"VolumeSource: num_records must be positive, got {num_records}")
        self.max_foreground_voxels = max_foreground_voxels
        digest = hashlib.sha256()
        for r in self._records:
            digest.update(f"{r['name']}|{r['shape']}|{r['class_counts'].tolist()};".encode())
        self._fingerprint = digest.hexdigest()[:16]

    def __len__(self) -> int:
        return self.num_records

    def __repr__(self) -> str:
        # grain compares repr(data_source) when restoring an iterator: it must not depend on the process.
        return (f"VolumeSource(num_volumes={len(self._records)}, num_records={self.num_records}, "
                f"max_foreground_voxels={self.max_foreground_voxels}, fingerprint={self._fingerprint})")

    def __getitem__(self, index: int) -> dict:
        record = self._records[int(index) % len(self._records)]
        return {k: _opened(v) for k, v in record.items() if k not in ("name", "shape")}

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(r["name"] for r in self._records)


class PatchSampler(grain.transforms.RandomMap):
    """Draws one patch per record, with nnU-Net's foreground oversampling.

    With probability ``foreground_fraction`` (nnU-Net: 1/3 of each batch, here per patch) the patch is
    *forced*: a foreground class is chosen, uniformly over the classes present in the volume when
    ``class_balanced`` (a one-voxel organ is chosen as often as the liver), else in proportion to the classes'
    voxel counts (uniform over all foreground voxels); then a voxel of that class, and the patch is placed so
    that the voxel falls at a uniformly random position among those the volume allows (not always the centre).
    Otherwise, and for a volume without foreground, the patch position is uniform over the volume.

    ``patch_shape``: one size per spatial axis of the volumes, or two sizes for 3D volumes: then a slice along
    ``slice_axis`` is drawn (the forced voxel's slice, or a uniform one) and the 2D patch taken in it, the
    remaining axes keeping their order.

    Along an axis where the volume is smaller than the patch, the volume sits at a random offset inside the
    patch and the rest is padding: image 0 (the normalized intensity mean), labels 0 (background).

    Output: ``{"image": (*patch_shape, C) float32, "labels": patch_shape int32}``.
    """

    def __init__(self, patch_shape: Sequence[int], *, slice_axis: int = 2, foreground_fraction: float = 1 / 3,
                 class_balanced: bool = True):
        self.patch_shape = tuple(int(p) for p in patch_shape)
        if len(self.patch_shape) not in (2, 3) or min(self.patch_shape) < 1:
            raise ValueError(f"PatchSampler: patch_shape must be 2 or 3 positive sizes, got {patch_shape!r}")
        if not 0.0 <= foreground_fraction <= 1.0:
            raise ValueError(f"PatchSampler: foreground_fraction must be in [0, 1], got {foreground_fraction}")
        if slice_axis not in (0, 1, 2):
            raise ValueError(f"PatchSampler: slice_axis must be 0, 1 or 2, got {slice_axis}")
        self.slice_axis = slice_axis
        self.foreground_fraction = float(foreground_fraction)
        self.class_balanced = bool(class_balanced)

    def _full_shape(self, ndim: int) -> tuple[int, ...]:
        """The patch as a box in the volume (size 1 along the slice axis for 2D patches of 3D volumes)."""
        if len(self.patch_shape) == ndim:
            return self.patch_shape
        if len(self.patch_shape) == 2 and ndim == 3:
            box = list(self.patch_shape)
            box.insert(self.slice_axis, 1)
            return tuple(box)
        raise ValueError(f"PatchSampler: patch_shape {self.patch_shape} does not fit {ndim}D volumes")

    def random_map(self, record: dict, rng: np.random.Generator) -> dict:
        rng = _record_rng(rng, "PatchSampler")
        image, labels = record["image"], record["labels"]
        shape = labels.shape
        box = self._full_shape(labels.ndim)
        # Start positions allowed along each axis: [min(0, S - P), max(0, S - P)] (negative = padding before).
        lo = np.minimum(0, np.subtract(shape, box))
        hi = np.maximum(0, np.subtract(shape, box))
        forced = rng.random() < self.foreground_fraction and len(record["classes"]) > 0
        if forced:
            counts = record["class_counts"]
            if self.class_balanced:
                k = rng.integers(len(counts))
            else:
                k = rng.choice(len(counts), p=counts / counts.sum())
            voxels = record["class_voxels"][k]
            voxel = voxels[rng.integers(len(voxels))]
            # Starts that keep the voxel inside the patch: start <= voxel <= start + P - 1.
            lo = np.maximum(lo, voxel - np.asarray(box) + 1)
            hi = np.minimum(hi, voxel)
        start = np.array([rng.integers(a, b + 1) for a, b in zip(lo, hi)])
        patch_image, patch_labels = _crop(image, labels, start, box)
        if len(box) != len(self.patch_shape):
            patch_image = np.squeeze(patch_image, axis=self.slice_axis)
            patch_labels = np.squeeze(patch_labels, axis=self.slice_axis)
        return {"image": patch_image, "labels": patch_labels}


def _crop(image: np.ndarray, labels: np.ndarray, start, box) -> tuple[np.ndarray, np.ndarray]:
    """The box at ``start`` (may reach outside the volume: zero padding), copied into new arrays."""
    out_image = np.zeros((*box, image.shape[-1]), np.float32)
    out_labels = np.zeros(box, np.int32)
    src, dst = [], []
    for s, p, size in zip(start, box, labels.shape):
        a, b = max(s, 0), min(s + p, size)
        src.append(slice(a, b))
        dst.append(slice(a - s, b - s))
    out_image[tuple(dst)] = image[tuple(src)]
    out_labels[tuple(dst)] = labels[tuple(src)]  # cast to int32 (a cached label map may be stored as uint8)
    return out_image, out_labels


def _check_range(name: str, value, *, positive: bool = False) -> tuple[float, float]:
    lo, hi = (float(v) for v in value)
    if lo > hi or (positive and lo <= 0):
        raise ValueError(f"Augment: {name} must be (low, high) with low <= high{' and low > 0' if positive else ''}, got {value!r}")
    return lo, hi


def _check_probability(name: str, p: float) -> float:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"Augment: {name} must be in [0, 1], got {p}")
    return float(p)


class Augment(grain.transforms.RandomMap):
    r"""Random geometric and intensity transforms of a patch; labels follow the geometric ones.

    Each transform happens with its own probability (0 switches it off), in this order:

    * flips along each axis of ``flip_axes`` (spatial axes of the patch), each with ``flip_probability``.
      Default none: in datasets with left and right organs (``kidney_left``, ``kidney_right``) a left-right
      flip would contradict the labels; name the axes where a mirror image is still a valid case.
    * a rotation by a multiple of 90 degrees in the plane ``rotate90_axes`` with ``rotate90_probability``:
      by 90, 180 or 270 degrees (uniformly) when the patch is square in that plane, else by 180 degrees only,
      so the patch keeps its shape. Default none, for the same reason as flips.
    * intensity scale :math:`x \cdot s`, :math:`s \sim U(\text{scale\_range})`, with ``scale_probability``;
    * intensity shift :math:`x + t`, :math:`t \sim U(\text{shift\_range})`, with ``shift_probability``;
    * gamma: :math:`m + (M - m) ((x - m) / (M - m))^\gamma`, :math:`\gamma \sim U(\text{gamma\_range})`, with
      ``gamma_probability``, where m and M are the patch's minimum and maximum (so the range is kept; a
      constant patch is left alone);
    * Gaussian noise of standard deviation :math:`\sigma \sim U(\text{noise\_std\_range})`, with
      ``noise_probability``.

    Intensity transforms act on every channel alike. Defaults follow nnU-Net's probabilities (scale 0.15,
    gamma 0.3, noise 0.1); the shift has no nnU-Net counterpart. Ranges are in normalized intensity units.
    """

    def __init__(self, *, flip_axes: Sequence[int] = (), flip_probability: float = 0.5,
                 rotate90_axes: tuple[int, int] | None = None, rotate90_probability: float = 0.5,
                 scale_range: tuple[float, float] = (0.75, 1.25), scale_probability: float = 0.15,
                 shift_range: tuple[float, float] = (-0.1, 0.1), shift_probability: float = 0.15,
                 gamma_range: tuple[float, float] = (0.7, 1.5), gamma_probability: float = 0.3,
                 noise_std_range: tuple[float, float] = (0.0, 0.1), noise_probability: float = 0.1):
        self.flip_axes = tuple(int(a) for a in flip_axes)
        if len(set(self.flip_axes)) != len(self.flip_axes) or any(a < 0 or a > 2 for a in self.flip_axes):
            raise ValueError(f"Augment: flip_axes must be distinct spatial axes in 0..2, got {flip_axes!r}")
        if rotate90_axes is not None:
            rotate90_axes = tuple(int(a) for a in rotate90_axes)
            if len(rotate90_axes) != 2 or rotate90_axes[0] == rotate90_axes[1] or min(rotate90_axes) < 0 or max(rotate90_axes) > 2:
                raise ValueError(f"Augment: rotate90_axes must be two distinct spatial axes in 0..2, got {rotate90_axes!r}")
        self.rotate90_axes = rotate90_axes
        self.flip_probability = _check_probability("flip_probability", flip_probability)
        self.rotate90_probability = _check_probability("rotate90_probability", rotate90_probability)
        self.scale_range = _check_range("scale_range", scale_range)
        self.scale_probability = _check_probability("scale_probability", scale_probability)
        self.shift_range = _check_range("shift_range", shift_range)
        self.shift_probability = _check_probability("shift_probability", shift_probability)
        self.gamma_range = _check_range("gamma_range", gamma_range, positive=True)
        self.gamma_probability = _check_probability("gamma_probability", gamma_probability)
        self.noise_std_range = _check_range("noise_std_range", noise_std_range)
        if self.noise_std_range[0] < 0:
            raise ValueError(f"Augment: noise_std_range must be non-negative, got {noise_std_range!r}")
        self.noise_probability = _check_probability("noise_probability", noise_probability)

    def random_map(self, record: dict, rng: np.random.Generator) -> dict:
        rng = _record_rng(rng, "Augment")
        image, labels = record["image"], record["labels"]
        ndim = labels.ndim
        used = self.flip_axes + (self.rotate90_axes or ())
        if used and max(used) >= ndim:
            raise ValueError(f"Augment: axes {used} do not all exist in a {ndim}D patch of shape {labels.shape}")
        for axis in self.flip_axes:
            if rng.random() < self.flip_probability:
                image, labels = np.flip(image, axis), np.flip(labels, axis)
        if self.rotate90_axes is not None and rng.random() < self.rotate90_probability:
            a, b = self.rotate90_axes
            k = int(rng.integers(1, 4)) if labels.shape[a] == labels.shape[b] else 2
            image, labels = np.rot90(image, k, axes=(a, b)), np.rot90(labels, k, axes=(a, b))
        image = np.array(image, np.float32)  # a fresh contiguous copy: the record's arrays are never modified
        if rng.random() < self.scale_probability:
            image *= np.float32(rng.uniform(*self.scale_range))
        if rng.random() < self.shift_probability:
            image += np.float32(rng.uniform(*self.shift_range))
        if rng.random() < self.gamma_probability:
            gamma = rng.uniform(*self.gamma_range)
            lo, hi = image.min(), image.max()
            if hi > lo:
                image = (lo + (hi - lo) * ((image - lo) / (hi - lo)) ** gamma).astype(np.float32)
        if rng.random() < self.noise_probability:
            std = rng.uniform(*self.noise_std_range)
            image += rng.normal(0.0, std, image.shape).astype(np.float32)
        return {"image": image, "labels": np.ascontiguousarray(labels, dtype=np.int32)}
