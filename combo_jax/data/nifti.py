"""Real volumes from NIfTI files: dataset layouts, up-front checks, preprocessing, an on-disk cache, and
writing predicted label maps back next to the scans they came from.

A dataset is a list of :class:`Case` (an image file and its label file, or several binary mask files, or no
label for prediction-only cases). :func:`read_msd` reads the Medical Segmentation Decathlon layout,
:func:`from_pairs` a plain list of paths. :func:`load_case` turns a case into a :class:`Volume`:

* ``image``: float32 ``(X, Y, Z, 1)``, channels-last, normalized (see :class:`Preprocessing`);
* ``labels``: int32 ``(X, Y, Z)`` with values ``0..K-1`` (0 = background), or None;

both **in the file's voxel axis order**: nothing is reoriented to RAS or any other convention, so axis 2 is
whatever the file stores third (for most CT and MRI exports, the slice axis). The file's affine and header
are kept on the volume; :func:`save_labels` writes a prediction with them, so it overlays the scan in any
viewer.

Every problem with the input (a missing file, an image and label of different grids, label values the
dataset does not declare, NaN voxels, a 4D image...) raises :class:`DatasetError` naming the file and the
problem, at load time, before any training step. :func:`check_dataset` runs every check over a whole
dataset and reports all problems at once.

    >>> info = read_msd("Task09_Spleen")
    >>> pre = Preprocessing(spacing=(1.5, 1.5, 3.0), modality="CT", ct_window=(-175.0, 250.0))
    >>> volumes = load_dataset(info.cases, pre, label_ids=info.label_ids, cache_dir="/tmp/spleen-cache")
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import uuid
import zipfile
from collections.abc import Mapping, Sequence
from typing import Any

import nibabel as nib
import numpy as np
import scipy.ndimage

# Image and label affines may differ by float32 rounding of the header fields; anything larger is a real
# mismatch (a label drawn on another grid). Units: mm for the translation column, mm per voxel elsewhere.
AFFINE_ATOL = 1e-3
AFFINE_RTOL = 1e-5
_CACHE_VERSION = 2
_NIFTI_SUFFIXES = (".nii.gz", ".nii")


class DatasetError(ValueError):
    """A dataset that cannot be used as given; the message names the file(s) and what is wrong."""


# --------------------------------------------------------------------------------------------------
# Dataset description
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    """One scan and its annotation.

    ``label`` is one of: a path to an integer label map; a tuple of paths to binary masks (values 0/1),
    combined by :func:`combine_masks` (mask ``i`` paints class ``i + 1`` over the classes before it, so nested
    structures are listed outer first: ``(cord, grey_matter)`` gives background / white matter / grey matter);
    or None for a prediction-only case.
    """

    name: str
    image: str
    label: str | tuple[str, ...] | None = None

    def files(self) -> tuple[str, ...]:
        """Every file the case reads, image first."""
        if self.label is None:
            return (self.image,)
        if isinstance(self.label, str):
            return (self.image, self.label)
        return (self.image, *self.label)


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """A dataset as described on disk: its cases, its declared labels (id -> name) and modalities."""

    root: str
    name: str
    cases: tuple[Case, ...]
    test_cases: tuple[Case, ...] = ()
    label_names: Mapping[int, str] | None = None
    modalities: tuple[str, ...] = ()

    @property
    def label_ids(self) -> tuple[int, ...] | None:
        """The declared label ids (sorted), or None when the dataset does not declare them."""
        return None if self.label_names is None else tuple(sorted(self.label_names))


def _case_name(path: str) -> str:
    base = os.path.basename(path)
    for suffix in _NIFTI_SUFFIXES:
        if base.endswith(suffix):
            return base[: -len(suffix)]
    return base


def is_nifti_file(name: str) -> bool:
    """Whether a file name is a NIfTI file's (.nii or .nii.gz; hidden files and macOS forks excluded)."""
    return name.endswith(_NIFTI_SUFFIXES) and not name.startswith(".")  # skips macOS "._x.nii.gz" forks


def from_pairs(pairs: Sequence[tuple[str, str | Sequence[str] | None]]) -> tuple[Case, ...]:
    """Cases from ``(image, label)`` paths; a label may be a path, a sequence of mask paths, or None.

    Each case is named after its image file without the ``.nii``/``.nii.gz`` suffix.
    """
    if len(pairs) == 0:
        raise DatasetError("from_pairs: the list of (image, label) pairs is empty")
    cases = []
    for i, pair in enumerate(pairs):
        if len(pair) != 2:
            raise DatasetError(f"from_pairs: item {i} is {pair!r}, expected (image, label) with label possibly None")
        image, label = pair
        if label is not None and not isinstance(label, (str, os.PathLike)):
            label = tuple(os.fspath(p) for p in label)
        elif label is not None:
            label = os.fspath(label)
        cases.append(Case(_case_name(os.fspath(image)), os.fspath(image), label))
    return tuple(cases)


def read_msd(root: str) -> DatasetInfo:
    """Reads a dataset in the Medical Segmentation Decathlon layout.

    With ``root/dataset.json``: its ``"training"`` list of ``{"image": "./imagesTr/x.nii.gz", "label":
    "./labelsTr/x.nii.gz"}`` gives the cases (paths relative to ``root``), ``"test"`` (a list of image paths)
    the prediction-only cases, ``"labels"`` (``{"0": "background", "1": "liver", ...}``) the declared label
    ids and ``"modality"`` (``{"0": "CT"}``) the image channels. An nnU-Net v2 ``dataset.json`` (no
    ``"training"`` list, ``"labels"`` as ``{"background": 0, "liver": 1}``, ``"channel_names"``) is read too,
    its cases paired from the folders as below.

    Without it: ``root/imagesTr`` and ``root/labelsTr`` with matching file names (an image may carry
    nnU-Net's channel suffix, ``x_0000.nii.gz`` for label ``x.nii.gz``); labels and modalities are then
    unknown. Files starting with a dot are skipped. Multi-channel cases (``x_0000``, ``x_0001``) are not
    supported.

    Raises :class:`DatasetError` for an empty or unreadable layout or a reference to a missing file.
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise DatasetError(f"dataset folder {root!r} does not exist or is not a folder")
    meta_path = os.path.join(root, "dataset.json")
    if os.path.exists(meta_path):
        return _read_dataset_json(root, meta_path)
    return DatasetInfo(root=root, name=os.path.basename(os.path.abspath(root)), cases=_pair_folders(root))


def _pair_folders(root: str) -> tuple[Case, ...]:
    """Cases from root/imagesTr and root/labelsTr, matched by file name (images may end in _0000)."""
    images_dir, labels_dir = os.path.join(root, "imagesTr"), os.path.join(root, "labelsTr")
    if not (os.path.isdir(images_dir) and os.path.isdir(labels_dir)):
        raise DatasetError(f"dataset folder {root!r} has neither a dataset.json nor imagesTr/ and labelsTr/ folders")
    images = sorted(f for f in os.listdir(images_dir) if is_nifti_file(f))
    labels = {_case_name(f): f for f in os.listdir(labels_dir) if is_nifti_file(f)}
    if not images:
        raise DatasetError(f"dataset folder {root!r}: imagesTr/ holds no .nii or .nii.gz files")
    cases, unmatched = {}, []
    for f in images:
        name = _case_name(f)
        key = name if name in labels else re.sub(r"_\d{4}$", "", name)
        if key in cases:
            raise DatasetError(
                f"dataset folder {root!r}: case {key!r} has several image files ({os.path.basename(cases[key].image)}, "
                f"{f}); multi-channel images are not supported"
            )
        if key not in labels:
            unmatched.append(f)
            continue
        cases[key] = Case(key, os.path.join(images_dir, f), os.path.join(labels_dir, labels[key]))
    orphans = sorted(f for k, f in labels.items() if k not in cases)
    if unmatched or orphans:
        raise DatasetError(
            f"dataset folder {root!r}: images without a label in labelsTr/: {unmatched[:5]}"
            f"{' ...' if len(unmatched) > 5 else ''}; labels without an image in imagesTr/: {orphans[:5]}"
        )
    return tuple(cases.values())


def _parse_label_names(raw: Any, meta_path: str) -> dict[int, str]:
    """MSD ``{"0": "background", ...}`` or nnU-Net v2 ``{"background": 0, ...}`` as ``{id: name}``."""
    if isinstance(raw, dict):
        try:
            return {int(k): str(v) for k, v in raw.items()}
        except ValueError:
            if all(isinstance(v, int) and not isinstance(v, bool) for v in raw.values()):
                return {v: str(k) for k, v in raw.items()}
    raise DatasetError(
        f"{meta_path}: \"labels\" must map ids to names ({{\"0\": \"background\"}}) or names to integer ids "
        f"({{\"background\": 0}}; region lists are not supported), got {raw!r}"
    )


def _read_dataset_json(root: str, meta_path: str) -> DatasetInfo:
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise DatasetError(f"{meta_path}: cannot read the dataset description: {err}") from err
    if not isinstance(meta, dict):
        raise DatasetError(f"{meta_path}: expected a JSON object, got {type(meta).__name__}")

    def resolve(rel: Any, where: str) -> str:
        if not isinstance(rel, str):
            raise DatasetError(f"{meta_path}: {where} is {rel!r}, expected a path string")
        return os.path.normpath(os.path.join(root, rel))

    training = meta.get("training")
    if training is None and "training" not in meta and "numTraining" in meta:  # nnU-Net v2: pair the folders
        cases = list(_pair_folders(root))
    elif not isinstance(training, list) or not training:
        raise DatasetError(f"{meta_path}: the \"training\" list is missing or empty")
    else:
        cases = []
        for i, entry in enumerate(training):
            if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
                raise DatasetError(f"{meta_path}: training[{i}] is {entry!r}, expected {{\"image\": ..., \"label\": ...}}")
            image = resolve(entry["image"], f"training[{i}].image")
            cases.append(Case(_case_name(image), image, resolve(entry["label"], f"training[{i}].label")))
    test_cases = tuple(
        Case(_case_name(p), p, None)
        for p in (resolve(t, f"test[{i}]") for i, t in enumerate(meta.get("test") or []))
    )
    missing = [p for c in (*cases, *test_cases) for p in c.files() if not os.path.isfile(p)]
    if missing:
        raise DatasetError(
            f"{meta_path} references {len(missing)} missing file(s): {', '.join(missing[:5])}"
            f"{' ...' if len(missing) > 5 else ''}"
        )
    label_names = _parse_label_names(meta["labels"], meta_path) if "labels" in meta else None
    modality = meta.get("modality") or meta.get("channel_names") or {}
    try:
        modalities = tuple(str(modality[k]) for k in sorted(modality, key=int))
    except (TypeError, ValueError, AttributeError) as err:
        raise DatasetError(f"{meta_path}: \"modality\" must map channel numbers to names, got {modality!r}") from err
    return DatasetInfo(
        root=root, name=str(meta.get("name", os.path.basename(os.path.abspath(root)))), cases=tuple(cases),
        test_cases=test_cases, label_names=label_names, modalities=modalities,
    )


def label_map_from_names(label_names: Mapping[int, str], names: Sequence[str]) -> dict[int, int]:
    """A ``label_map`` keeping the named structures: ``names[i]`` becomes class ``i + 1``, the rest background.

    To merge structures into one class, write the mapping by hand (``{2: 1, 3: 1}``: both kidneys are class 1).
    """
    by_name = {v: int(k) for k, v in label_names.items()}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise DatasetError(f"label names {unknown} are not in the dataset's labels ({', '.join(sorted(by_name))})")
    return {by_name[n]: i + 1 for i, n in enumerate(names)}


# --------------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class Preprocessing:
    """How a case becomes a volume the network sees.

    * ``spacing``: target voxel size in mm per file axis, or None to keep the file's grid. Images are resampled
      with linear interpolation, labels with nearest neighbour (see :func:`resample`).
    * ``modality``: ``"CT"`` clips to ``ct_window`` (Hounsfield units) and then z-scores with the clipped
      volume's own mean and standard deviation; ``"MRI"`` z-scores with the volume's mean and standard
      deviation. Both are **per volume**: nnU-Net instead z-scores CT with statistics of the foreground voxels
      pooled over the training set (and clips at their 0.5 / 99.5 percentiles); per-volume statistics need no
      pass over the dataset and keep every case self-contained, at the price of slightly different intensity
      scales between scans. A constant volume becomes all zeros.
    * ``label_map``: ``{dataset_id: class_index}``; ids not listed become background (0). Class indices must
      cover ``1..K-1`` (several ids may share one). None keeps the file's ids as classes.
    """

    spacing: tuple[float, ...] | None = None
    modality: str = "CT"
    ct_window: tuple[float, float] = (-175.0, 250.0)
    label_map: tuple[tuple[int, int], ...] | Mapping[int, int] | None = None

    def __post_init__(self):
        if self.spacing is not None:
            spacing = tuple(float(s) for s in self.spacing)
            if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
                raise ValueError(f"Preprocessing.spacing must be three positive sizes in mm, got {self.spacing!r}")
            object.__setattr__(self, "spacing", spacing)
        modality = str(self.modality).upper()
        if modality not in ("CT", "MRI"):
            raise ValueError(f"Preprocessing.modality must be 'CT' or 'MRI', got {self.modality!r}")
        object.__setattr__(self, "modality", modality)
        lo, hi = (float(v) for v in self.ct_window)
        if not lo < hi:
            raise ValueError(f"Preprocessing.ct_window must be (low, high) with low < high, got {self.ct_window!r}")
        object.__setattr__(self, "ct_window", (lo, hi))
        if self.label_map is not None:
            items = self.label_map.items() if isinstance(self.label_map, Mapping) else self.label_map
            try:
                pairs = tuple(sorted((int(k), int(v)) for k, v in items))
            except (TypeError, ValueError) as err:
                raise ValueError(f"Preprocessing.label_map must map integer ids to class indices, got {self.label_map!r}") from err
            if not pairs:
                raise ValueError("Preprocessing.label_map is empty; use None to keep the file's label ids")
            ids = [k for k, _ in pairs]
            if len(set(ids)) != len(ids):
                raise ValueError(f"Preprocessing.label_map maps an id twice: {list(pairs)}")
            classes = {v for _, v in pairs}
            if min(ids) < 0 or min(classes) < 0:
                raise ValueError(f"Preprocessing.label_map needs non-negative ids and classes, got {dict(pairs)}")
            missing = set(range(1, max(classes) + 1)) - classes
            if missing:
                raise ValueError(
                    f"Preprocessing.label_map classes must cover 1..{max(classes)}; no id maps to {sorted(missing)}"
                )
            object.__setattr__(self, "label_map", pairs)

    @property
    def num_classes(self) -> int | None:
        """K (background included) when a label_map is set, else None (the dataset's ids decide)."""
        return None if self.label_map is None else max(v for _, v in self.label_map) + 1


def resample(array: np.ndarray, scale: Sequence[float], shape: Sequence[int], *, order: int) -> np.ndarray:
    """Resamples the leading ``len(scale)`` axes of ``array`` onto a grid of ``shape``.

    Output voxel ``i`` along an axis samples input position ``x = (i + 1/2) * scale - 1/2`` (voxel centres,
    unit voxel = the input's): both grids start at the same outer edge, so a block of ``scale`` input voxels
    becomes one output voxel and the field of view is kept. Positions beyond the first or last input voxel
    take the edge value. ``order=1``: linear (exact for a linear ramp); ``order=0``: nearest neighbour,
    ``floor(x + 1/2)``, for label maps (values are copied, never blended). Trailing axes (channels) are kept.
    """
    scale = [float(s) for s in scale]
    n = len(scale)
    if order == 0:
        out = array
        for axis, (s, size) in enumerate(zip(scale, shape)):
            x = (np.arange(size) + 0.5) * s - 0.5
            index = np.clip(np.floor(x + 0.5).astype(np.int64), 0, array.shape[axis] - 1)
            out = np.take(out, index, axis=axis)
        return out
    if order != 1:
        raise ValueError(f"resample: order must be 0 (nearest) or 1 (linear), got {order}")
    if array.ndim > n:  # channels: one call per channel
        flat = array.reshape(*array.shape[:n], -1)
        out = np.stack([resample(flat[..., c], scale, shape, order=1) for c in range(flat.shape[-1])], axis=-1)
        return out.reshape(*shape, *array.shape[n:])
    offset = [0.5 * s - 0.5 for s in scale]
    return scipy.ndimage.affine_transform(
        array, np.asarray(scale), offset=offset, output_shape=tuple(int(s) for s in shape), order=1, mode="nearest"
    )


def resampled_shape(shape: Sequence[int], spacing: Sequence[float], new_spacing: Sequence[float]) -> tuple[int, ...]:
    """``round(shape * spacing / new_spacing)`` per axis (at least 1)."""
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, new_spacing))


def normalize(image: np.ndarray, preprocessing: Preprocessing) -> np.ndarray:
    r"""Intensity normalization by modality (float32 arithmetic, statistics accumulated in float64).

    CT: :math:`c = \mathrm{clip}(x, lo, hi)`, :math:`(c - \bar c) / \sigma_c`; MRI: :math:`(x - \bar x) /
    \sigma_x`. Means and standard deviations are over the whole volume (population std); a zero std leaves the
    centred values (all zero).
    """
    x = np.asarray(image, np.float32)
    if preprocessing.modality == "CT":
        x = np.clip(x, *preprocessing.ct_window)
    mean = x.mean(dtype=np.float64)
    std = np.sqrt(np.mean(np.square(x - np.float32(mean), dtype=np.float64)))
    return ((x - np.float32(mean)) * np.float32(1.0 / (std if std > 0 else 1.0))).astype(np.float32)


def combine_masks(masks: Sequence[np.ndarray]) -> np.ndarray:
    """One label map from binary masks: class ``i + 1`` where mask ``i`` is set, later masks painted over
    earlier ones; 0 elsewhere. Nested structures go outer first: ``combine_masks([cord, grey_matter])`` gives
    1 = white matter (cord minus grey matter) and 2 = grey matter.
    """
    labels = np.zeros(np.shape(masks[0]), np.int32)
    for i, mask in enumerate(masks):
        labels[np.asarray(mask) != 0] = i + 1
    return labels


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class Volume:
    """A preprocessed case.

    ``image`` float32 ``(X, Y, Z, 1)`` and ``labels`` int32 ``(X, Y, Z)`` (or None) on the resampled grid,
    in the file's voxel order; ``spacing`` their voxel size (mm); ``original_shape`` and ``original_spacing``
    the file's grid; ``affine`` the file's 4x4 voxel-to-world matrix and ``header`` the image's NIfTI header
    (both for :func:`save_labels`).
    """

    name: str
    image: np.ndarray
    labels: np.ndarray | None
    spacing: tuple[float, float, float]
    original_shape: tuple[int, int, int]
    original_spacing: tuple[float, float, float]
    affine: np.ndarray
    header: Any
    # For training: per foreground class present, its voxel count and up to FOREGROUND_SAMPLE coordinates
    # (:func:`foreground_index`); computed when the volume is cached, so a memory-mapped volume is never read whole.
    foreground: dict | None = None

    @property
    def resampled(self) -> bool:
        return tuple(self.image.shape[:3]) != tuple(self.original_shape) or not np.allclose(
            self.spacing, self.original_spacing
        )


def _load_nifti(path: str):
    if not os.path.isfile(path):
        raise DatasetError(f"{path}: file not found")
    try:
        return nib.load(path)
    except Exception as err:  # nibabel raises many types for a corrupt or non-NIfTI file
        raise DatasetError(f"{path}: not a readable NIfTI file ({type(err).__name__}: {err})") from err


def _spatial(shape: tuple[int, ...], path: str) -> tuple[int, int, int]:
    """The 3D grid of a file's shape: 2D files get a size-1 third axis, a size-1 fourth axis is dropped."""
    if len(shape) == 2:
        return (*shape, 1)
    if len(shape) == 4 and shape[3] == 1:
        return shape[:3]
    if len(shape) != 3:
        raise DatasetError(
            f"{path}: {len(shape)}D image of shape {shape}; only 3D volumes are supported (a 4D file may have a "
            "single volume along its fourth axis)"
        )
    return shape


def _read_array(img, path: str, grid: tuple[int, int, int], *, what: str) -> np.ndarray:
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as err:
        raise DatasetError(f"{path}: cannot decode the {what} voxels ({type(err).__name__}: {err})") from err
    return data.reshape(grid)


def _check_same_grid(img, path: str, ref_img, ref_path: str) -> None:
    grid, ref_grid = _spatial(img.shape, path), _spatial(ref_img.shape, ref_path)
    if grid != ref_grid:
        raise DatasetError(f"{path}: label grid {grid} differs from the image grid {ref_grid} of {ref_path}")
    if not np.allclose(img.affine, ref_img.affine, rtol=AFFINE_RTOL, atol=AFFINE_ATOL):
        diff = np.abs(img.affine - ref_img.affine).max()
        raise DatasetError(
            f"{path}: label affine differs from the affine of image {ref_path} (largest difference {diff:.4g}):\n"
            f"{np.array2string(img.affine, precision=4)}\nvs\n{np.array2string(ref_img.affine, precision=4)}"
        )


def _integer_labels(data: np.ndarray, path: str) -> np.ndarray:
    if data.dtype.kind == "f":
        bad = ~np.isfinite(data) | (data != np.round(data))
        if bad.any():
            examples = np.unique(data[bad])[:5]
            raise DatasetError(f"{path}: label values must be integers; found {int(bad.sum())} voxels like {examples}")
    elif data.dtype.kind not in "iub":
        raise DatasetError(f"{path}: label voxels have dtype {data.dtype}, expected integers")
    data = data.astype(np.int64)
    if data.size and data.min() < 0:
        raise DatasetError(f"{path}: negative label values {np.unique(data[data < 0])[:5]}")
    return data


def _read_labels(case: Case, image_img, grid) -> tuple[np.ndarray, str]:
    """The case's integer label map (int64, file ids) and a description of its source for messages."""
    if isinstance(case.label, str):
        img = _load_nifti(case.label)
        _check_same_grid(img, case.label, image_img, case.image)
        return _integer_labels(_read_array(img, case.label, grid, what="label"), case.label), case.label
    masks = []
    for path in case.label:
        img = _load_nifti(path)
        _check_same_grid(img, path, image_img, case.image)
        mask = _integer_labels(_read_array(img, path, grid, what="mask"), path)
        if mask.size and mask.max() > 1:
            raise DatasetError(f"{path}: a mask must hold 0 and 1 only, found values {np.unique(mask)[:8]}")
        masks.append(mask)
    return combine_masks(masks).astype(np.int64), f"masks {', '.join(case.label)}"


def _map_labels(labels: np.ndarray, source: str, preprocessing: Preprocessing, label_ids) -> np.ndarray:
    present = np.unique(labels)
    if label_ids is not None:
        unknown = np.setdiff1d(present, np.asarray(label_ids))
        if unknown.size:
            raise DatasetError(
                f"{source}: label values {unknown.tolist()[:10]} are not ids of the dataset (declared: "
                f"{list(label_ids)[:20]}{' ...' if len(label_ids) > 20 else ''})"
            )
    if preprocessing.label_map is None:
        return labels.astype(np.int32)
    lut = np.zeros(int(max(present.max(), max(k for k, _ in preprocessing.label_map))) + 1, np.int32)
    for k, v in preprocessing.label_map:
        lut[k] = v
    return lut[labels]


def _cache_key(case: Case, preprocessing: Preprocessing, label_ids) -> str:
    def stat(path):
        st = os.stat(path)
        return [os.path.abspath(path), st.st_size, st.st_mtime_ns]

    key = {
        "version": _CACHE_VERSION,
        "files": [stat(p) for p in case.files()],
        "label_kind": None if case.label is None else ("file" if isinstance(case.label, str) else "masks"),
        "preprocessing": dataclasses.asdict(preprocessing),
        "label_ids": None if label_ids is None else sorted(int(i) for i in label_ids),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def _cache_path(cache_dir: str, case: Case, key: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", case.name)[:80]
    return os.path.join(cache_dir, f"{safe}-{key}")


FOREGROUND_SAMPLE = 10_000  # coordinates kept per class for the patch sampler's foreground oversampling


def foreground_index(labels: np.ndarray, max_voxels: int = FOREGROUND_SAMPLE, *, seed: int = 0) -> dict:
    """Per foreground class present: up to ``max_voxels`` random coordinates (fixed ``seed``) and its voxel count.

    Returns ``{"classes": int32 (P,), "class_counts": int64 (P,), "class_voxels": tuple of P int32 (n_k, ndim)}``.
    """
    flat = np.asarray(labels).ravel()
    fg = np.flatnonzero(flat)
    values = flat[fg]
    order = np.argsort(values, kind="stable")
    fg, values = fg[order], values[order]
    classes, starts, counts = np.unique(values, return_index=True, return_counts=True)
    rng = np.random.default_rng(seed)
    coords = []
    for start, count in zip(starts, counts):
        members = fg[start:start + count]
        if count > max_voxels:
            members = np.sort(rng.choice(members, max_voxels, replace=False))
        coords.append(np.stack(np.unravel_index(members, labels.shape), axis=-1).astype(np.int32))
    return {"classes": classes.astype(np.int32), "class_voxels": tuple(coords), "class_counts": counts.astype(np.int64)}


def read_volume_cache(path: str, name: str) -> Volume | None:
    """A cached volume (:func:`write_volume_cache`) with its arrays memory-mapped read-only, or None when the folder
    is absent or unreadable. Nothing but the small metadata is read: a patch sampler reads only the patches it
    draws, and the pages it touched stay in the page cache, not in the process."""
    try:
        with open(os.path.join(path, "meta.json")) as f:
            meta = json.load(f)
        header_class = {"Nifti1Header": nib.Nifti1Header, "Nifti2Header": nib.Nifti2Header}[meta["header_class"]]
        with open(os.path.join(path, "header.bin"), "rb") as f:
            header = header_class(binaryblock=f.read())
        image = np.load(os.path.join(path, "image.npy"), mmap_mode="r")
        labels = foreground = None
        if meta["has_labels"]:
            labels = np.load(os.path.join(path, "labels.npy"), mmap_mode="r")
            with np.load(os.path.join(path, "foreground.npz"), allow_pickle=False) as f:
                classes = f["classes"]
                foreground = {"classes": classes, "class_counts": f["class_counts"],
                              "class_voxels": tuple(f[f"voxels_{i}"] for i in range(len(classes)))}
        return Volume(name=name, image=image, labels=labels, spacing=tuple(meta["spacing"]),
                      original_shape=tuple(meta["original_shape"]), original_spacing=tuple(meta["original_spacing"]),
                      affine=np.asarray(meta["affine"], np.float64), header=header, foreground=foreground)
    except (OSError, KeyError, ValueError, zipfile.BadZipFile, EOFError):
        return None  # absent or unreadable (e.g. a half-deleted folder): recompute and overwrite


def write_volume_cache(path: str, volume: Volume) -> None:
    """Stores a volume as a folder: ``image.npy``, ``labels.npy`` (the smallest integer type that holds them),
    ``foreground.npz`` (:func:`foreground_index`), ``header.bin`` and ``meta.json``. Written into a temporary folder
    and renamed, so a reader sees the old folder, none, or the complete new one."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    os.makedirs(tmp)
    try:
        np.save(os.path.join(tmp, "image.npy"), np.ascontiguousarray(volume.image, np.float32))
        meta = {"spacing": list(volume.spacing), "original_shape": list(volume.original_shape),
                "original_spacing": list(volume.original_spacing), "affine": np.asarray(volume.affine).tolist(),
                "header_class": type(volume.header).__name__, "has_labels": volume.labels is not None}
        if volume.labels is not None:
            labels = np.asarray(volume.labels)
            top = int(labels.max()) if labels.size else 0
            dtype = np.uint8 if top < 256 else np.int16 if top < 2**15 else np.int32
            np.save(os.path.join(tmp, "labels.npy"), labels.astype(dtype))
            index = volume.foreground or foreground_index(labels)
            np.savez(os.path.join(tmp, "foreground.npz"), classes=index["classes"], class_counts=index["class_counts"],
                     **{f"voxels_{i}": v for i, v in enumerate(index["class_voxels"])})
        with open(os.path.join(tmp, "header.bin"), "wb") as f:
            f.write(volume.header.binaryblock)
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f)
        if os.path.isdir(path):  # an unreadable old entry: moved aside, then removed
            old = f"{path}.{uuid.uuid4().hex[:8]}.old"
            os.rename(path, old)
            shutil.rmtree(old, ignore_errors=True)
        os.rename(tmp, path)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def load_case(
    case: Case, preprocessing: Preprocessing, *, label_ids: Sequence[int] | None = None, cache_dir: str | None = None
) -> Volume:
    """Reads, checks and preprocesses one case (see the module docstring for the layout).

    Steps: read the image (a 2D file becomes ``(X, Y, 1)``; a size-1 fourth axis is dropped; other 4D files are
    an error), reject NaN/inf voxels, read the labels (same grid and affine as the image within
    ``AFFINE_ATOL``/``AFFINE_RTOL``, integer values, only ``label_ids`` when given), remap them with
    ``preprocessing.label_map``, resample to ``preprocessing.spacing``, normalize.

    ``cache_dir``: the preprocessed arrays are stored there in a folder ``<name>-<key>`` (:func:`write_volume_cache`,
    written to a temporary folder, then renamed), ``key`` hashing the absolute paths, sizes and modification times
    of the case's files, the preprocessing and ``label_ids``; a later call with the same key decodes no NIfTI and
    reads nothing of the arrays: the volume it returns is memory-mapped (:func:`read_volume_cache`), as is the one
    a first call returns. Only the header's 348/540-byte block is cached (NIfTI extensions are not).
    """
    key = path = None
    if cache_dir is not None:
        for p in case.files():
            if not os.path.isfile(p):
                raise DatasetError(f"{p}: file not found (case {case.name!r})")
        key = _cache_key(case, preprocessing, label_ids)
        path = _cache_path(cache_dir, case, key)
        cached = read_volume_cache(path, case.name)
        if cached is not None:
            return cached

    img = _load_nifti(case.image)
    grid = _spatial(img.shape, case.image)
    try:
        image = np.asarray(img.get_fdata(dtype=np.float32)).reshape(grid)
    except Exception as err:
        raise DatasetError(f"{case.image}: cannot decode the image voxels ({type(err).__name__}: {err})") from err
    finite = np.isfinite(image)
    if not finite.all():
        raise DatasetError(f"{case.image}: {int((~finite).sum())} of {image.size} image voxels are NaN or infinite")
    labels = None
    if case.label is not None:
        raw, source = _read_labels(case, img, grid)
        labels = _map_labels(raw, source, preprocessing, label_ids)

    original_spacing = tuple(float(z) for z in img.header.get_zooms()[:3])
    if len(original_spacing) < 3:
        original_spacing = original_spacing + (1.0,) * (3 - len(original_spacing))
    spacing = original_spacing
    if preprocessing.spacing is not None and not np.allclose(preprocessing.spacing, original_spacing):
        spacing = preprocessing.spacing
        shape = resampled_shape(grid, original_spacing, spacing)
        scale = [t / s for s, t in zip(original_spacing, spacing)]
        image = resample(image, scale, shape, order=1)
        if labels is not None:
            labels = resample(labels, scale, shape, order=0)
    volume = Volume(
        name=case.name,
        image=normalize(image, preprocessing)[..., None],
        labels=None if labels is None else np.ascontiguousarray(labels, dtype=np.int32),
        spacing=tuple(spacing),
        original_shape=tuple(grid),
        original_spacing=original_spacing,
        affine=np.asarray(img.affine, np.float64),
        header=img.header.copy(),
    )
    if path is not None:
        write_volume_cache(path, volume)
        return read_volume_cache(path, case.name)  # memory-mapped, like every later cache hit
    return volume


def _run_all(cases, preprocessing, label_ids, cache_dir, keep: bool) -> list[Volume]:
    if len(cases) == 0:
        raise DatasetError("the dataset has no cases")
    missing = [f"{p} (case {c.name!r})" for c in cases for p in c.files() if not os.path.isfile(p)]
    if missing:  # cheap, before decoding anything
        raise DatasetError(f"{len(missing)} missing file(s): " + "; ".join(missing[:10]) + (" ..." if len(missing) > 10 else ""))
    volumes, problems = [], []
    for case in cases:
        try:
            volume = load_case(case, preprocessing, label_ids=label_ids, cache_dir=cache_dir)
        except DatasetError as err:
            problems.append(str(err))
            continue
        if keep:
            volumes.append(volume)
    if problems:
        raise DatasetError(f"{len(problems)} of {len(cases)} case(s) cannot be used:\n" + "\n".join(problems))
    return volumes


def check_dataset(
    cases: Sequence[Case], preprocessing: Preprocessing, *, label_ids: Sequence[int] | None = None,
    cache_dir: str | None = None,
) -> None:
    """Runs every check of :func:`load_case` on every case and raises one :class:`DatasetError` listing all
    problems. With ``cache_dir`` the preprocessed cases are cached on the way, so a later load is cheap."""
    _run_all(cases, preprocessing, label_ids, cache_dir, keep=False)


def load_dataset(
    cases: Sequence[Case], preprocessing: Preprocessing, *, label_ids: Sequence[int] | None = None,
    cache_dir: str | None = None,
) -> list[Volume]:
    """:func:`load_case` over every case; all problems are reported together, as :func:`check_dataset` does."""
    return _run_all(cases, preprocessing, label_ids, cache_dir, keep=True)


# --------------------------------------------------------------------------------------------------
# Writing predictions
# --------------------------------------------------------------------------------------------------


def to_original_grid(array: np.ndarray, volume: Volume, *, order: int = 0) -> np.ndarray:
    """An array on the volume's (resampled) grid, ``(X, Y, Z)`` or ``(X, Y, Z, C)``, on the file's grid.

    ``order=0`` (nearest neighbour) for label maps, ``order=1`` (linear) for probabilities. The inverse of the
    resampling in :func:`load_case`: a label map that is constant on the blocks of voxels that one resampled
    voxel covers comes back unchanged. Without resampling the array is returned as is.
    """
    grid = tuple(volume.image.shape[:3])
    if tuple(array.shape[:3]) != grid:
        raise ValueError(f"to_original_grid: array shape {array.shape} does not start with the volume grid {grid}")
    if not volume.resampled:
        return array
    scale = [s / t for s, t in zip(volume.original_spacing, volume.spacing)]
    return resample(array, scale, volume.original_shape, order=order)


def save_labels(path: str, labels: np.ndarray, reference: Volume) -> None:
    """Writes an integer label map as NIfTI with the reference's affine and header (qform/sform and their codes
    kept), resampled back to the file's grid when the reference was resampled.

    ``labels``: ``(X, Y, Z)`` on the reference's grid (or already on the file's grid). Stored as uint8 when
    every value is below 256, else int16 or int32; scaling is reset to slope 1, intercept 0.
    """
    labels = np.asarray(labels)
    if labels.dtype.kind not in "iub":
        raise ValueError(f"save_labels({path!r}): labels must be integers, got dtype {labels.dtype}")
    grid = tuple(reference.image.shape[:3])
    if labels.shape == grid:
        labels = to_original_grid(labels, reference, order=0)
    elif labels.shape != tuple(reference.original_shape):
        raise ValueError(
            f"save_labels({path!r}): labels of shape {labels.shape} fit neither the volume grid {grid} nor the "
            f"file grid {tuple(reference.original_shape)}"
        )
    lo, hi = (int(labels.min()), int(labels.max())) if labels.size else (0, 0)
    if lo < 0:
        raise ValueError(f"save_labels({path!r}): negative label values (min {lo})")
    dtype = np.uint8 if hi < 256 else np.int16 if hi < 2**15 else np.int32
    header = reference.header.copy()
    header.set_data_dtype(dtype)
    header.set_slope_inter(1.0, 0.0)
    header["cal_min"], header["cal_max"] = 0, hi
    image_class = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    image = image_class(labels.astype(dtype), reference.affine, header=header)
    image.to_filename(os.fspath(path))
