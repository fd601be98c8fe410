"""The datasets a config names, as training sees them: grain sources of training records and validation cases.

* ``config.data.name == "phantom"``: :class:`PhantomSource`, the embedded procedural phantom.
* ``config.data.name == "nifti"``: real volumes (an MSD task folder or a list of files), loaded, checked,
  preprocessed and cached by :mod:`combo_jax.data.nifti`, sampled into patches by :mod:`combo_jax.data.pipeline`.

:func:`make_loader` walks one global order of the records and loads this process's rows of each global batch.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import threading
import time
from typing import Any

import grain
import jax
import numpy as np

from combo_jax import distributed
from combo_jax.config import ConfigError, class_names
from combo_jax.data import phantom


class PhantomSource:
    """Random-access phantom cases; generated once per process on first use."""

    def __init__(self, seed: int, shape, num_cases: int, offset: int):
        self.seed, self.shape, self.num_cases, self.offset = seed, tuple(shape), num_cases, offset
        self._cache: dict[int, dict] = {}

    def __len__(self):
        return self.num_cases

    def __repr__(self):  # grain checks a restored iterator against repr(data_source)
        return f"PhantomSource(seed={self.seed}, shape={self.shape}, num_cases={self.num_cases}, offset={self.offset})"

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if index not in self._cache:
            image, labels = phantom.make_case(self.seed, self.offset + index, self.shape)
            self._cache[index] = {"image": image, "labels": labels}
        return self._cache[index]


def _exit_when_orphaned(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)  # the training process is gone (kill -9, a crash): nobody will read this worker's batches


class ExitWithParent(grain.transforms.Map):
    """Passes records through. In a grain worker process it starts, on first use, a watchdog that ends the worker
    when its parent (the training process) is gone, so a killed run leaves no orphaned workers behind."""

    def __init__(self):
        self._watching = False

    def map(self, record):
        if not self._watching:
            self._watching = True
            if multiprocessing.parent_process() is not None:  # a worker, not the training process itself
                threading.Thread(target=_exit_when_orphaned, args=(os.getppid(),), daemon=True).start()
        return record


def make_loader(source, *, batch_size: int, shuffle: bool, seed: int, num_epochs, worker_count: int,
                operations=()):
    """A grain DataLoader yielding this process's share (batch_size // process_count) of each global batch.

    Every process walks the same global order of the records and loads its own rows of each global batch
    (``distributed.ProcessShareSampler``), so a step's global batch is the same for any number of processes.
    ``operations`` (grain transforms, e.g. patch sampling and augmentation) run on each record before batching.
    """
    if worker_count:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; a library caller may have parsed none
            flags.FLAGS.mark_as_parsed()
    order = grain.samplers.IndexSampler(num_records=len(source), shuffle=shuffle, num_epochs=num_epochs, seed=seed)
    sampler = distributed.ProcessShareSampler(order, batch_size=batch_size, process_index=jax.process_index(),
                                              process_count=jax.process_count())
    return grain.DataLoader(
        data_source=source,
        sampler=sampler,
        shard_options=grain.sharding.NoSharding(),  # the sampler already picks this process's rows
        operations=[*([ExitWithParent()] if worker_count else []), *operations,
                    grain.transforms.Batch(batch_size=batch_size // jax.process_count(), drop_remainder=True)],
        worker_count=worker_count,
    )


@dataclasses.dataclass
class Data:
    """A dataset as training sees it: a source of training records and the validation cases.

    The phantom's validation cases all have one shape and are evaluated in batches (``val_source``); real volumes
    differ in size and are evaluated whole, one at a time, by sliding-window inference (``val_volumes``).
    """

    class_names: tuple[str, ...]
    train_source: Any
    train_operations: tuple  # grain transforms applied to each training record before batching
    spacing: tuple[float, ...]  # voxel size in mm of the validation data
    shares: np.ndarray  # fraction of validation voxels in each class, shape (K,)
    train_shares: np.ndarray  # fraction of training voxels in each class, shape (K,) (frequency weighting)
    description: str  # one line for the report
    slice_axis: int = 0  # the axis a 3D volume is shown (and a 2D model predicts it) slice by slice along
    val_source: Any = None
    val_volumes: list | None = None

    @property
    def num_val(self) -> int:
        return len(self.val_source) if self.val_source is not None else len(self.val_volumes)


_PHANTOM_VAL_OFFSET = 1_000_000  # validation case i is phantom case 1_000_000 + i; training case i is case i


def make_data(config) -> Data:
    """The datasets a config names (checked: a problem with the data is a ConfigError or a DatasetError)."""
    d = config.data
    if d.name == "phantom":
        train = PhantomSource(d.seed, d.shape, d.num_train, offset=0)
        val = PhantomSource(d.seed, d.shape, d.num_val, offset=_PHANTOM_VAL_OFFSET)

        def shares(source):  # the class frequencies of the split's first 16 cases (not kept: workers copy sources)
            return phantom.class_frequencies(d.seed, tuple(d.shape), min(16, len(source)), offset=source.offset)

        return Data(
            class_names=phantom.CLASS_NAMES,
            train_source=train,
            train_operations=(),
            spacing=(1.0,) * len(d.shape),
            shares=shares(val),
            train_shares=shares(train),
            description=f"embedded phantom, {d.num_train} training and {d.num_val} validation cases of "
                        f"{' x '.join(map(str, d.shape))} voxels (1 mm)",
            val_source=val,
        )
    return _make_volume_data(config)


def default_cache_dir() -> str:
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "combo_jax")


def augmentation(config):
    """The :class:`combo_jax.data.pipeline.Augment` of ``config.data.augment``."""
    from combo_jax.data import pipeline

    return pipeline.Augment(**{k: tuple(v) if isinstance(v, (list, tuple)) else v
                               for k, v in config.data.augment.items()})


def volume_preprocessing(config):
    """The :class:`combo_jax.data.nifti.Preprocessing` a real-volume config names (training and prediction)."""
    from combo_jax.data import nifti

    d = config.data
    return nifti.Preprocessing(
        spacing=tuple(d.spacing) or None, modality=d.modality, ct_window=tuple(d.ct_window),
        label_map={int(i): k + 1 for k, i in enumerate(d.label_ids)},
    )


def _slab(volume, axis: int, start: int, stop: int, suffix: str):
    """Slices ``start:stop`` along ``axis`` of a volume, as a volume of its own (on its own, resampled grid)."""
    take = lambda a: np.take(a, np.arange(start, stop), axis=axis)  # noqa: E731
    labels = take(volume.labels).astype(np.int32)
    return dataclasses.replace(volume, name=f"{volume.name}{suffix}", image=take(volume.image), labels=labels,
                               original_shape=labels.shape, original_spacing=volume.spacing, foreground=None)


def volume_cases(config):
    """The NIfTI cases of a real-volume config and the label ids its dataset declares (None when it declares
    none), checking the configured ``label_ids`` against the declared ones."""
    from combo_jax.data import nifti

    d = config.data
    if not d.root:
        raise ConfigError("config.data.root is empty: set it to the dataset folder (an MSD task, or the folder that "
                          "config.data.cases is relative to); the real-sample configs find theirs only in "
                          "../shared/data beside the repository")
    if not os.path.isdir(d.root):
        raise ConfigError(f"config.data.root={d.root!r} is not a folder")
    if d.cases:
        def under_root(p):
            if p is None:
                return None
            return os.path.join(d.root, p) if isinstance(p, str) else tuple(os.path.join(d.root, q) for q in p)

        return nifti.from_pairs([(under_root(image), under_root(label)) for image, label in d.cases]), None
    info = nifti.read_msd(d.root)
    declared = info.label_ids
    if declared is not None:
        unknown = [(organ, i) for organ, i in zip(d.organs, d.label_ids) if i not in declared]
        if unknown:
            raise ConfigError(
                "config.data.label_ids: " + ", ".join(f"{i} (organ {organ!r})" for organ, i in unknown)
                + f" not among the label ids {os.path.join(d.root, 'dataset.json')} declares "
                f"({', '.join(map(str, declared))})")
    return info.cases, declared


def _class_counts(volume, k: int) -> np.ndarray:
    """Voxels of each class 0..k-1 of a volume; from its foreground index when it has one (a cached, memory-mapped
    volume is not read for this)."""
    index = getattr(volume, "foreground", None)
    if index is None:
        return np.bincount(np.asarray(volume.labels).ravel(), minlength=k)
    counts = np.zeros(k, np.int64)
    counts[index["classes"]] = index["class_counts"]
    counts[0] = int(np.prod(volume.labels.shape)) - counts[1:].sum()
    return counts


def _make_volume_data(config) -> Data:
    """Real volumes (``config.data.name == "nifti"``): loaded, checked, preprocessed and cached up front."""
    from combo_jax.data import nifti, pipeline

    d = config.data
    cases, declared = volume_cases(config)
    volumes = nifti.load_dataset(cases, volume_preprocessing(config), label_ids=declared,
                                 cache_dir=d.cache_dir or default_cache_dir())
    k = len(d.organs) + 1
    counts = sum(_class_counts(v, k) for v in volumes)
    absent = [f"{i} (organ {organ!r})" for organ, i, n in zip(d.organs, d.label_ids, counts[1:]) if n == 0]
    if absent:
        raise ConfigError(f"config.data.label_ids: {', '.join(absent)} occur(s) in no label file of the dataset "
                          f"({len(volumes)} case(s) under {d.root}); training would learn background only")
    names = ", ".join(v.name for v in volumes)
    if d.val_slab:
        start, stop = (int(x) for x in d.val_slab)
        if len(volumes) != 1:
            raise ConfigError(f"config.data.val_slab splits a single case, but the dataset has {len(volumes)} cases; "
                              "use config.data.num_val instead")
        volume, axis = volumes[0], d.slice_axis
        depth = volume.labels.shape[axis]
        if not 0 <= start < stop <= depth or (start == 0 and stop == depth):
            raise ConfigError(f"config.data.val_slab={tuple(d.val_slab)} must be (start, stop) with 0 <= start < stop "
                              f"<= {depth} (slices along config.data.slice_axis={axis}) leaving slices for training")
        val = [_slab(volume, axis, start, stop, f"[{start}:{stop}]")]
        train = [_slab(volume, axis, a, b, f"[{a}:{b}]") for a, b in ((0, start), (stop, depth)) if b > a]
        description = (f"one case ({names}); validation on slices {start}-{stop - 1} along axis {axis}, training on "
                       f"the other {depth - (stop - start)} slices: a pipeline check on real anatomy, not a benchmark")
    else:
        if not 1 <= d.num_val < len(volumes):
            raise ConfigError(f"config.data.num_val={d.num_val} must hold out between 1 and {len(volumes) - 1} of the "
                              f"{len(volumes)} cases (or set config.data.val_slab for a single case)")
        train, val = volumes[: -d.num_val], volumes[-d.num_val:]
        description = f"{len(train)} training and {len(val)} validation cases from {d.root}"
    val_counts = sum(_class_counts(v, k) for v in val)
    train_counts = sum(_class_counts(v, k) for v in train)
    missing = [organ for organ, n in zip(d.organs, train_counts[1:]) if n == 0]
    if missing and config.loss.get("frequency_power", 0.0) > 0:
        raise ConfigError(f"config.loss.frequency_power weighs the classes by their training frequencies, but organ(s) "
                          f"{', '.join(map(repr, missing))} occur in no training case ({description}); set "
                          "config.loss.frequency_power=0 or give config.loss.class_weights")
    spacing = tuple(val[0].spacing)
    return Data(
        class_names=class_names(config),
        train_source=pipeline.VolumeSource(train, num_records=d.num_train),
        train_operations=(
            pipeline.PatchSampler(tuple(d.shape), slice_axis=d.slice_axis, foreground_fraction=d.foreground_fraction,
                                  class_balanced=d.class_balanced),
            augmentation(config),
        ),
        spacing=spacing,
        shares=val_counts / val_counts.sum(),
        train_shares=train_counts / train_counts.sum(),
        description=f"{description}; voxel size {' x '.join(f'{s:g}' for s in spacing)} mm",
        slice_axis=d.slice_axis,
        val_volumes=val,
    )
