"""Training: ``train_and_evaluate(config, workdir)`` trains a U-Net with a loss chosen by name.

Read top to bottom: configuration checks, the mesh and shardings, the data, the model and optimizer, the
jitted steps, checkpoint restore, the loop (log, evaluate, checkpoint, stop on a signal), the final report.

Layout: images ``(B, *spatial, C)``, labels ``(B, *spatial)`` int32, channels-last. Batches are split over a
one-axis device mesh ``("data",)``; parameters are replicated. Each process loads only its share of a global
batch (grain, sharded by process) and the global array is assembled with
``jax.make_array_from_process_local_data``, so one code path serves 1 CPU, fake CPU devices, a GPU, a TPU and
several hosts.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import os
import signal
import time
from typing import Any

import grain
import jax
import jax.numpy as jnp
import jax.experimental.multihost_utils
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from combo_jax import distributed, losses, metrics
from combo_jax.data import phantom
from combo_jax.models.unet import UNet

# The losses a config can name, and the options each takes from config.loss.
LOSSES = {
    "combo": losses.combo_loss,
    "dice": losses.dice_loss,
    "wce": losses.weighted_cross_entropy,
    "dice_ce": losses.dice_ce_loss,
    "focal": losses.focal_loss,
    "tversky": losses.tversky_loss,
    "generalized_dice": losses.generalized_dice_loss,
}
_NOT_CONFIGURABLE = ("logits", "labels", "where", "ignore_index", "reduction")


def loss_options(name: str) -> dict:
    """Default options of a loss by name (those with a non-None default), for a config's ``loss`` section."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; expected one of {', '.join(LOSSES)}")
    options = {}
    for param in inspect.signature(LOSSES[name]).parameters.values():
        if param.name in _NOT_CONFIGURABLE or param.default is None or param.default is inspect.Parameter.empty:
            continue
        options[param.name] = param.default
    return options


class ConfigError(ValueError):
    """A configuration that cannot run, found before any training work."""


# --------------------------------------------------------------------------------------------------
# Configuration checks: every mistake we can detect is reported before the first step.
# --------------------------------------------------------------------------------------------------


def check_config(config: ml_collections.ConfigDict, workdir: str, *, num_devices: int | None = None) -> None:
    loss = config.loss
    if loss.name not in LOSSES:
        raise ConfigError(f"config.loss.name: unknown loss {loss.name!r}; expected one of {', '.join(LOSSES)}")
    accepted = set(inspect.signature(LOSSES[loss.name]).parameters) - set(_NOT_CONFIGURABLE)
    for key in loss.keys():
        if key != "name" and key not in accepted:
            raise ConfigError(
                f"config.loss.{key} is not an option of loss {loss.name!r} (its options: {', '.join(sorted(accepted))}); "
                f"to switch losses use the config argument, e.g. --config=configs/default.py:{loss.name}"
            )
    d = config.data
    if d.name not in ("phantom", "nifti"):
        raise ConfigError(f"config.data.name: unknown dataset {d.name!r}; expected 'phantom' or 'nifti'")
    if d.spatial_dims not in (2, 3) or d.spatial_dims != len(d.shape):
        raise ConfigError(f"config.data.spatial_dims={d.spatial_dims} must be 2 or 3 and match config.data.shape={tuple(d.shape)}")
    class_names = phantom.CLASS_NAMES if d.name == "phantom" else ("background", *d.organs)
    if config.model.num_classes != len(class_names):
        raise ConfigError(
            f"config.model.num_classes={config.model.num_classes} but the data has {len(class_names)} classes "
            f"({', '.join(class_names)})"
        )
    divisor = 2 ** (len(config.model.features) - 1)
    shapes = {"config.data.shape": tuple(d.shape)}
    if d.name == "nifti":
        shapes["config.eval.window"] = tuple(config.eval.window)
        if len(config.eval.window) != d.spatial_dims:
            raise ConfigError(f"config.eval.window={tuple(config.eval.window)} must have {d.spatial_dims} sizes (config.data.spatial_dims)")
        if not 0.0 <= config.eval.overlap < 1.0:
            raise ConfigError(f"config.eval.overlap={config.eval.overlap} must be in [0, 1)")
        unknown = set(d.augment.keys()) - set(augment_options())
        if unknown:
            raise ConfigError(f"config.data.augment has unknown options {sorted(unknown)}; the options are "
                              f"{', '.join(augment_options())}")
    for name, shape in shapes.items():
        if any(s <= 0 or s % divisor for s in shape):
            raise ConfigError(
                f"{name}={shape}: every size must be a positive multiple of 2^(levels-1) = {divisor} "
                f"for config.model.features={tuple(config.model.features)}"
            )
    devices = jax.device_count() if num_devices is None else num_devices
    processes = jax.process_count()
    for name in ("batch_size", "eval_batch_size"):
        size = config.train[name]
        if size <= 0 or size % devices or size % processes:
            raise ConfigError(
                f"config.train.{name}={size} must be a positive multiple of the device count ({devices}) and of the "
                f"process count ({processes}): each global batch is split evenly over devices"
            )
    if d.name == "phantom" and d.num_val % config.train.eval_batch_size:
        raise ConfigError(
            f"config.data.num_val={config.data.num_val} must be a multiple of config.train.eval_batch_size="
            f"{config.train.eval_batch_size} so that every validation case is evaluated"
        )
    if config.train.on_nonfinite not in ("stop", "skip"):
        raise ConfigError(f"config.train.on_nonfinite must be 'stop' or 'skip', got {config.train.on_nonfinite!r}")
    if config.optimizer.name not in ("adamw", "sgd"):
        raise ConfigError(f"config.optimizer.name must be 'adamw' or 'sgd', got {config.optimizer.name!r}")
    if config.model.dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"config.model.dtype must be 'float32' or 'bfloat16', got {config.model.dtype!r}")
    for name in ("num_steps", "log_every", "eval_every", "checkpoint_every"):
        if config.train[name] <= 0:
            raise ConfigError(f"config.train.{name} must be positive, got {config.train[name]}")
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write_test_{jax.process_index()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as err:
        raise ConfigError(f"workdir {workdir!r} is not writable: {err}") from err


# --------------------------------------------------------------------------------------------------
# Data: a grain DataLoader per split, sharded by process.
# --------------------------------------------------------------------------------------------------


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


def make_loader(source, *, batch_size: int, shuffle: bool, seed: int, num_epochs, worker_count: int,
                operations=()):
    """A grain DataLoader yielding this process's share (batch_size // process_count) of each global batch.

    Every process walks the same global order of the records and loads its own rows of each global batch
    (``distributed.ProcessShareSampler``), so a step's global batch is the same for any number of processes.
    ``operations`` (grain transforms, e.g. patch sampling and augmentation) run on each record before batching.
    """
    order = grain.samplers.IndexSampler(num_records=len(source), shuffle=shuffle, num_epochs=num_epochs, seed=seed)
    sampler = distributed.ProcessShareSampler(order, batch_size=batch_size, process_index=jax.process_index(),
                                              process_count=jax.process_count())
    return grain.DataLoader(
        data_source=source,
        sampler=sampler,
        shard_options=grain.sharding.NoSharding(),  # the sampler already picks this process's rows
        operations=[*operations, grain.transforms.Batch(batch_size=batch_size // jax.process_count(), drop_remainder=True)],
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
    description: str  # one line for the report
    slice_axis: int = 0  # the axis a 3D volume is shown (and a 2D model predicts it) slice by slice along
    val_source: Any = None
    val_volumes: list | None = None

    @property
    def num_val(self) -> int:
        return len(self.val_source) if self.val_source is not None else len(self.val_volumes)


def make_data(config) -> Data:
    """The datasets a config names."""
    d = config.data
    if d.name == "phantom":
        val = PhantomSource(d.seed, d.shape, d.num_val, offset=1_000_000)
        return Data(
            class_names=phantom.CLASS_NAMES,
            train_source=PhantomSource(d.seed, d.shape, d.num_train, offset=0),
            train_operations=(),
            spacing=(1.0,) * len(d.shape),
            shares=phantom.class_frequencies(d.seed, tuple(d.shape), num_cases=min(16, d.num_val)),
            description=f"embedded phantom, {d.num_train} training and {d.num_val} validation cases of "
                        f"{' x '.join(map(str, d.shape))} voxels (1 mm)",
            val_source=val,
        )
    return _make_volume_data(config)


def augment_options() -> dict:
    """The options of :class:`combo_jax.data.pipeline.Augment` with their defaults, for ``config.data.augment``."""
    from combo_jax.data import pipeline

    return {p.name: p.default for p in inspect.signature(pipeline.Augment).parameters.values()}


def default_cache_dir() -> str:
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "combo_jax")


def _slab(volume, axis: int, start: int, stop: int, suffix: str):
    """Slices ``start:stop`` along ``axis`` of a volume, as a volume of its own (on its own, resampled grid)."""
    take = lambda a: np.take(a, np.arange(start, stop), axis=axis)  # noqa: E731
    labels = take(volume.labels)
    return dataclasses.replace(volume, name=f"{volume.name}{suffix}", image=take(volume.image), labels=labels,
                               original_shape=labels.shape, original_spacing=volume.spacing)


def volume_preprocessing(config):
    """The :class:`combo_jax.data.nifti.Preprocessing` a real-volume config names (training and prediction)."""
    from combo_jax.data import nifti

    d = config.data
    return nifti.Preprocessing(
        spacing=tuple(d.spacing) or None, modality=d.modality, ct_window=tuple(d.ct_window),
        label_map={int(i): k + 1 for k, i in enumerate(d.label_ids)},
    )


def _make_volume_data(config) -> Data:
    """Real volumes (``config.data.name == "nifti"``): loaded, checked, preprocessed and cached up front."""
    from combo_jax.data import nifti, pipeline

    d = config.data
    if not d.root:
        raise ConfigError("config.data.root is empty: set it to the dataset folder (an MSD task or the folder "
                          "that config.data.cases is relative to)")
    if not os.path.isdir(d.root):
        raise ConfigError(f"config.data.root={d.root!r} is not a directory")
    if len(d.label_ids) != len(d.organs):
        raise ConfigError(f"config.data.label_ids={tuple(d.label_ids)} must give one dataset label id per organ in "
                          f"config.data.organs={tuple(d.organs)}")
    declared = None
    if d.cases:
        def under_root(p):
            return None if p is None else os.path.join(d.root, p) if isinstance(p, str) else tuple(os.path.join(d.root, q) for q in p)

        cases = nifti.from_pairs([(under_root(image), under_root(label)) for image, label in d.cases])
    else:
        info = nifti.read_msd(d.root)
        cases, declared = info.cases, info.label_ids
    volumes = nifti.load_dataset(cases, volume_preprocessing(config), label_ids=declared, cache_dir=d.cache_dir or default_cache_dir())
    names = ", ".join(v.name for v in volumes)
    if d.val_slab:
        start, stop = (int(x) for x in d.val_slab)
        if len(volumes) != 1:
            raise ConfigError(f"config.data.val_slab splits a single case, but the dataset has {len(volumes)} cases; "
                              "use config.data.num_val instead")
        volume, axis = volumes[0], d.slice_axis
        depth = volume.labels.shape[axis]
        if not 0 <= start < stop <= depth or (start == 0 and stop == depth):
            raise ConfigError(f"config.data.val_slab={tuple(d.val_slab)} must be (start, stop) with 0 <= start < stop <= "
                              f"{depth} (slices along config.data.slice_axis={axis}) leaving slices for training")
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
    counts = sum(np.bincount(v.labels.ravel(), minlength=len(d.organs) + 1) for v in val)
    spacing = tuple(val[0].spacing)
    return Data(
        class_names=("background", *d.organs),
        train_source=pipeline.VolumeSource(train, num_records=d.num_train),
        train_operations=(
            pipeline.PatchSampler(tuple(d.shape), slice_axis=d.slice_axis, foreground_fraction=d.foreground_fraction,
                                  class_balanced=d.class_balanced),
            pipeline.Augment(**{k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in d.augment.items()}),
        ),
        spacing=spacing,
        shares=counts / counts.sum(),
        description=f"{description}; voxel size {' x '.join(f'{s:g}' for s in spacing)} mm",
        slice_axis=d.slice_axis,
        val_volumes=val,
    )


def global_batch(local: dict, sharding: NamedSharding) -> dict:
    """Assembles the per-process arrays into global arrays split over the mesh's data axis."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}


# --------------------------------------------------------------------------------------------------
# Model, optimizer, steps
# --------------------------------------------------------------------------------------------------


def make_model(config, *, rngs: nnx.Rngs) -> UNet:
    m = config.model
    return UNet(
        spatial_dims=config.data.spatial_dims,
        in_channels=1,
        num_classes=m.num_classes,
        features=tuple(m.features),
        norm=m.norm,
        deep_supervision=m.deep_supervision,
        dtype=jnp.bfloat16 if m.dtype == "bfloat16" else jnp.float32,
        remat=m.remat,
        rngs=rngs,
    )


def make_optimizer(config) -> tuple[optax.GradientTransformation, optax.Schedule]:
    o, steps = config.optimizer, config.train.num_steps
    if o.name == "adamw":
        schedule = optax.warmup_cosine_decay_schedule(
            0.0, o.learning_rate, min(o.warmup_steps, steps - 1), steps, end_value=o.learning_rate * o.final_lr_fraction
        )
        core = optax.adamw(schedule, weight_decay=o.weight_decay)
    else:  # nnU-Net: SGD, Nesterov momentum 0.99, lr * (1 - step / steps) ** 0.9
        schedule = optax.polynomial_schedule(o.learning_rate, 0.0, o.poly_power, steps)
        core = optax.chain(optax.add_decayed_weights(o.weight_decay), optax.sgd(schedule, o.momentum, nesterov=True))
    return optax.chain(optax.clip_by_global_norm(o.clip_norm), core), schedule


@dataclasses.dataclass
class TrainState:
    """Everything a resumed run needs besides the data iterator, as one pytree for orbax."""

    step: jax.Array
    params: Any
    opt_state: Any
    nonfinite_step: jax.Array  # first step whose loss or gradients were not finite, or -1


jax.tree_util.register_dataclass(TrainState, data_fields=["step", "params", "opt_state", "nonfinite_step"], meta_fields=[])


def init_state(config):
    """The model's graph, a fresh TrainState, the optimizer and its learning-rate schedule."""
    model = make_model(config, rngs=nnx.Rngs(params=config.seed))
    graphdef, params = nnx.split(model, nnx.Param)
    tx, schedule = make_optimizer(config)
    state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), jnp.full((), -1, jnp.int32))
    return graphdef, state, tx, schedule


def load_run(workdir: str, *, checkpoint: str = "best"):
    """(config, graphdef, params, step) of a training run's ``best`` or ``latest`` checkpoint, on the host."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: {workdir!r} is not a combo_jax training workdir")
    with open(path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    if checkpoint not in ("best", "latest"):
        raise ValueError(f"checkpoint must be 'best' or 'latest', got {checkpoint!r}")
    manager = ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints", checkpoint))
    step = manager.latest_step() if checkpoint == "latest" else manager.best_step()
    if step is None:
        raise FileNotFoundError(f"no {checkpoint} checkpoint under {workdir}/checkpoints/{checkpoint}")
    graphdef, state, _, _ = init_state(config)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
    return config, graphdef, restored["state"].params, step


def make_loss_fn(config):
    options = {k: v for k, v in config.loss.items() if k != "name"}
    if "class_weights" in options:
        options["class_weights"] = tuple(options["class_weights"])
    loss = functools.partial(LOSSES[config.loss.name], **options)

    def loss_fn(outputs, labels):
        if isinstance(outputs, list):  # deep supervision: full resolution weighted 1, then halves
            weights = [0.5**i for i in range(len(outputs))]
            return sum(w * loss(o, labels) for w, o in zip(weights, outputs)) / sum(weights)
        return loss(outputs, labels)

    return loss_fn


def make_train_step(graphdef, tx, loss_fn):
    def train_step(state: TrainState, batch: dict):
        def objective(params):
            return loss_fn(nnx.merge(graphdef, params)(batch["image"]), batch["labels"])

        loss, grads = jax.value_and_grad(objective)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        finite = jnp.isfinite(loss) & jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
        # A non-finite step never touches the parameters; with on_nonfinite="stop" the host stops at the
        # next log line, naming the step recorded here.
        params, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), (params, opt_state), (state.params, state.opt_state))
        first_bad = jnp.where((state.nonfinite_step < 0) & ~finite, state.step, state.nonfinite_step)
        new_state = TrainState(state.step + 1, params, opt_state, first_bad)
        return new_state, {"loss": loss, "finite": finite, "grad_norm": optax.tree.norm(grads)}

    return train_step


def make_eval_steps(graphdef) -> dict:
    """The model's full-resolution logits (``apply``) and its predicted label map (``eval``), unjitted."""

    def apply(params, image):
        outputs = nnx.merge(graphdef, params)(image)
        return (outputs[0] if isinstance(outputs, list) else outputs).astype(jnp.float32)

    def eval_step(params, batch):
        return jnp.argmax(apply(params, batch["image"]), axis=-1).astype(jnp.int32)

    return {"apply": apply, "eval": eval_step}


# --------------------------------------------------------------------------------------------------
# Logging
# --------------------------------------------------------------------------------------------------


class Logger:
    """metrics.jsonl rows and TensorBoard scalars, written by process 0 only."""

    def __init__(self, workdir: str):
        self.active = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.tb = None
        if self.active:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(workdir, flush_secs=10)

    def write(self, row: dict) -> None:
        if not self.active:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        step = row["step"]
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.tb.add_scalar(f"{row.get('split', 'train')}/{key}", value, step)

    def close(self):
        if self.tb is not None:
            self.tb.close()


def _progress(total: int, initial: int):
    if jax.process_index() != 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)


# --------------------------------------------------------------------------------------------------
# The whole run
# --------------------------------------------------------------------------------------------------


def maybe_initialize_distributed() -> None:
    """Joins the multi-process job a launcher describes (``combo_jax.distributed``); a no-op when already joined."""
    distributed.initialize()


def _to_host(x: jax.Array) -> np.ndarray:
    """A (possibly multi-process) global array as one numpy array on every process."""
    if jax.process_count() > 1:
        return np.asarray(jax.experimental.multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def _confusion(pred: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """(TP, FP, FN) per class of one case, shape (3, K), on the host."""
    matrix = np.bincount(labels.ravel().astype(np.int64) * k + pred.ravel(), minlength=k * k).reshape(k, k)
    tp = np.diag(matrix)
    return np.stack([tp, matrix.sum(0) - tp, matrix.sum(1) - tp])


def predict_volume(config, apply_fn, params, image: np.ndarray, sharding) -> np.ndarray:
    """Logits of one whole volume ``(*spatial, C)`` by sliding-window inference, windows split over the mesh.

    A 2D model on a 3D volume predicts it slice by slice along ``config.data.slice_axis``.
    """
    from combo_jax import inference

    def run(windows: np.ndarray) -> np.ndarray:
        x = jax.make_array_from_callback(windows.shape, sharding, lambda index: windows[index])
        return _to_host(apply_fn(params, x))

    options = dict(window=tuple(config.eval.window), overlap=config.eval.overlap, batch_size=config.train.eval_batch_size)
    if config.data.spatial_dims == 2 and image.ndim == 4:
        return inference.predict_slices(run, image, slice_axis=config.data.slice_axis, **options)
    return inference.sliding_window_inference(run, image, **options)


def evaluate(config, data: Data, params, steps: dict, sharding, *, keep_predictions: int = 0):
    """Per-organ metrics of the validation split, and a few (image, labels, prediction) triples.

    Overlap metrics come from confusion counts summed over every validation voxel (dataset-level Dice, precision,
    recall, false-positive and false-negative volumes). Surface metrics (HD95, mean surface distance, normalized
    surface Dice) are computed per case on the host at the data's voxel spacing and averaged over cases; a case
    where the organ is missing from exactly one of prediction and truth has an infinite distance, which is left
    out of the mean and counted (``*_inf_cases``).
    """
    k = config.model.num_classes
    counts = np.zeros((3, k), np.int64)
    volumes_ml = np.zeros((2, k))  # false-positive and false-negative volume, each case at its own voxel size
    surface = []
    examples = []

    def add_case(image, labels, pred, spacing):
        case = _confusion(pred, labels, k)
        counts[:] += case
        volumes_ml[:] += case[1:] * float(np.prod(spacing)) / 1000.0
        surface.append(metrics.surface_metrics(pred, labels, k, spacing=spacing, tolerance_mm=config.eval.nsd_tolerance_mm))
        if len(examples) < keep_predictions:
            examples.append((image, labels, pred))

    if data.val_source is not None:
        loader = make_loader(data.val_source, batch_size=config.train.eval_batch_size, shuffle=False, seed=0,
                             num_epochs=1, worker_count=0)
        for local in loader:
            batch = global_batch(local, sharding)
            pred, labels = _to_host(steps["eval"](params, batch)), _to_host(batch["labels"])
            images = _to_host(batch["image"]) if len(examples) < keep_predictions else None  # only to keep examples
            for i in range(len(pred)):
                add_case(None if images is None else images[i], labels[i], pred[i], data.spacing)
    else:
        for volume in data.val_volumes:
            logits = predict_volume(config, steps["apply"], params, volume.image, sharding)
            add_case(volume.image, volume.labels, np.argmax(logits, axis=-1).astype(np.int32), volume.spacing)
    tp, fp, fn = counts
    summary = metrics.summarize(tp, fp, fn)
    for organ, row in summary["organs"].items():
        row["fp_ml"], row["fn_ml"] = float(volumes_ml[0, organ]), float(volumes_ml[1, organ])
        for key in ("hd95_mm", "msd_mm", "nsd"):
            row[key], row[f"{key}_inf_cases"] = metrics.mean_finite([case[organ][key] for case in surface])
    return summary, examples


def _barrier_prefix(name: str) -> ocp.options.MultiprocessingOptions:
    # With several processes orbax synchronizes each save at barriers named after the step; the latest and best
    # managers both save the last step, so each needs its own names.
    return ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=name)


# Settings a resumed run may change: how long to train, how often to log, evaluate and save, how to evaluate,
# and where the data and its cache live. Everything else decides which batches and which updates the run made.
_RESUMABLE_CHANGES = ("train.num_steps", "train.log_every", "train.eval_every", "train.checkpoint_every",
                      "train.keep_checkpoints", "train.on_nonfinite", "train.eval_batch_size", "eval.", "data.root",
                      "data.cache_dir", "model.remat")  # remat: what the backward pass recomputes


def write_text_atomic(path: str, text: str) -> None:
    """Writes ``text`` to ``path`` so that a concurrent reader sees the old file or the complete new one."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def flatten_config(tree: dict, prefix: str = "") -> dict:
    """A nested config dict (e.g. a config.json) as ``{"data.shape": ..., "loss.beta": ...}``."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_resume(config, workdir: str) -> None:
    """Refuses to resume a workdir whose checkpoints were made with a different configuration.

    Resuming restores the data iterator and the optimizer state; with another seed, dataset, model, loss,
    optimizer or batch size the restored state would not belong to the run, so any such difference is an error
    naming the fields. Training longer (``train.num_steps``) or logging, evaluating and saving at other
    intervals is allowed.
    """
    path = os.path.join(workdir, "config.json")
    latest = os.path.join(workdir, "checkpoints", "latest")
    if not (os.path.exists(path) and os.path.isdir(latest) and any(n.isdigit() for n in os.listdir(latest))):
        return
    with open(path) as f:
        before = flatten_config(json.load(f))
    now = flatten_config(json.loads(config.to_json_best_effort()))
    changed = [
        f"config.{key}: {before.get(key, '(absent)')!r} in the saved run, {now.get(key, '(absent)')!r} now"
        for key in sorted(set(before) | set(now))
        if before.get(key) != now.get(key) and not any(key == c or (c.endswith(".") and key.startswith(c)) for c in _RESUMABLE_CHANGES)
    ]
    if changed:
        raise ConfigError(
            f"workdir {workdir!r} holds checkpoints of a run with a different configuration ({'; '.join(changed)}). "
            "Rerun with the run's own settings to resume it, or use a new workdir for a new run."
        )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, devices=None) -> dict:
    """Trains, evaluates and checkpoints; resumes from workdir/checkpoints if a run is there.

    ``devices`` (default: all devices of all processes) lets a single-process caller use a subset.
    Returns the final evaluation summary ({"mean_fg_dice", "organs"}), or {} when stopped by a signal.
    """
    maybe_initialize_distributed()
    devices = list(jax.devices() if devices is None else devices)
    check_config(config, workdir, num_devices=len(devices))
    is_main = jax.process_index() == 0
    started = time.time()
    check_resume(config, workdir)
    if is_main:  # what predict (load_run) and the experiment runner read back; other processes may be reading it
        write_text_atomic(os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=1))

    # Mesh: one data axis over every device of every process; batches split, parameters replicated.
    mesh = jax.sharding.Mesh(np.asarray(devices), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    data_sharding = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())

    # Data.
    data = make_data(config)
    train_loader = make_loader(
        data.train_source, batch_size=config.train.batch_size, shuffle=True, seed=config.seed, num_epochs=None,
        worker_count=config.data.worker_count, operations=data.train_operations,
    )
    train_iter = iter(train_loader)

    # Model and optimizer: split once into a static graph and a parameter pytree.
    graphdef, state, tx, schedule = init_state(config)
    state = jax.device_put(state, replicated)
    train_step = jax.jit(
        make_train_step(graphdef, tx, make_loss_fn(config)),
        in_shardings=(replicated, data_sharding),
        out_shardings=(replicated, replicated),
        donate_argnums=(0,),
    )
    steps = make_eval_steps(graphdef)
    steps = {
        "eval": jax.jit(steps["eval"], in_shardings=(replicated, data_sharding), out_shardings=data_sharding),
        "apply": jax.jit(steps["apply"], in_shardings=(replicated, data_sharding), out_shardings=data_sharding),
    }

    # Checkpoints: the last few in checkpoints/latest, the best by validation Dice in checkpoints/best. Orbax
    # writes each into a temporary directory and renames it when complete, so a half-written checkpoint is
    # never taken for a good one.
    ckpt_dir = os.path.abspath(os.path.join(workdir, "checkpoints"))
    latest = ocp.CheckpointManager(
        os.path.join(ckpt_dir, "latest"),
        options=ocp.CheckpointManagerOptions(max_to_keep=config.train.keep_checkpoints,
                                             multiprocessing_options=_barrier_prefix("latest")),
    )
    best = ocp.CheckpointManager(
        os.path.join(ckpt_dir, "best"),
        options=ocp.CheckpointManagerOptions(max_to_keep=1, best_fn=lambda m: m["mean_fg_dice"], best_mode="max",
                                             multiprocessing_options=_barrier_prefix("best")),
    )
    if latest.latest_step() is not None:
        try:
            restored = latest.restore(
                latest.latest_step(),
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(jax.tree.map(ocp.utils.to_shape_dtype_struct, state)),
                    data=grain.checkpoint.CheckpointRestore(train_iter),
                ),
            )
        except ValueError as err:
            if "does not match" not in str(err):
                raise
            raise ConfigError(  # e.g. another process count: each process's data position is saved separately
                f"the checkpoint in {latest.directory} was written by a run whose data loading differs from this "
                f"one (another process count or dataset size?): {str(err).splitlines()[0]} Resume with the run's "
                "own settings, or use a new workdir."
            ) from err
        state = restored["state"]
        if is_main:
            print(f"resumed from {latest.directory} at step {int(state.step)}", flush=True)

    def save(manager, step, metrics_row=None):
        manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(train_iter)),
            metrics=metrics_row,
            force=True,
        )

    # Stop cleanly on SIGTERM/SIGINT: finish the step, save, exit.
    stop = {"signal": None}

    def on_signal(signum, frame):
        stop["signal"] = signum

    def stop_requested(step: int) -> bool:
        # Several processes must leave the loop at the same step: one that stops alone leaves the others
        # waiting forever in the next step's collectives. They agree at every log step, where the host
        # waits for the device anyway; one process's signal stops them all.
        if jax.process_count() == 1:
            return stop["signal"] is not None
        if step % config.train.log_every:
            return False
        signalled = jax.experimental.multihost_utils.process_allgather(np.int32(stop["signal"] is not None))
        return bool(np.any(signalled))

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    logger = Logger(workdir)
    t = config.train
    step = int(state.step)
    bar = _progress(t.num_steps, step)
    summary, examples, evaluated_at = None, [], None
    last_log = (time.time(), step)
    pending = []  # device-side metrics not yet read, so logging never waits on the current step
    try:
        stopped = False
        while step < t.num_steps:
            if stop_requested(step):
                stopped = True
                break
            batch = global_batch(next(train_iter), data_sharding)
            state, out = train_step(state, batch)
            step += 1
            pending.append((step, out))
            if step % t.log_every == 0 or step == t.num_steps:
                bad = int(state.nonfinite_step)
                if bad >= 0 and t.on_nonfinite == "stop":
                    raise FloatingPointError(
                        f"non-finite loss or gradient at step {bad + 1} (the update was not applied); set "
                        f"config.train.on_nonfinite='skip' to skip such steps instead"
                    )
                now = time.time()
                rate = (step - last_log[1]) / max(now - last_log[0], 1e-9)
                last_log = (now, step)
                for s, o in pending:
                    row = {"step": s, "loss": float(o["loss"]), "grad_norm": float(o["grad_norm"]),
                           "learning_rate": float(schedule(s - 1)), "finite": bool(o["finite"])}
                    logger.write(row)
                pending = []
                if bar is not None:
                    bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['learning_rate']:.2e}", steps_s=f"{rate:.2f}")
            if bar is not None:
                bar.update(1)
            if step % t.eval_every == 0 or step == t.num_steps:
                keep = config.eval.num_predictions if step == t.num_steps else 0
                summary, examples = evaluate(config, data, state.params, steps, data_sharding, keep_predictions=keep)
                evaluated_at = step
                logger.write({"step": step, "split": "eval", "mean_fg_dice": summary["mean_fg_dice"], "organs": _named(summary["organs"], data.class_names)})
                save(best, step, {"mean_fg_dice": summary["mean_fg_dice"]})
            if step % t.checkpoint_every == 0 or step == t.num_steps:
                save(latest, step)
        if stopped:
            if latest.latest_step() != step:  # the loop may have just saved this step
                save(latest, step)
            latest.wait_until_finished()
            if is_main:
                print(f"\nstopped by signal {stop['signal'] or 'on another process'} at step {step}; checkpoint saved, rerun the same command to resume", flush=True)
            return {}
    finally:
        if bar is not None:
            bar.close()
        latest.wait_until_finished()
        best.wait_until_finished()
        logger.close()
        for s, handler in previous.items():
            signal.signal(s, handler)

    # Final evaluation and report; the loop's evaluation of the last step serves unless the run was already
    # finished when this call started.
    if evaluated_at != step:
        summary, examples = evaluate(config, data, state.params, steps, data_sharding,
                                     keep_predictions=config.eval.num_predictions)
    if is_main:
        write_summary(config, data, workdir, summary, elapsed=time.time() - started, steps=step)
        write_report(config, data, workdir, summary, examples, elapsed=time.time() - started, steps=step)
    return summary


def _named(organs: dict, class_names) -> dict:
    return {class_names[k]: v for k, v in organs.items()}


def write_summary(config, data: Data, workdir: str, summary: dict, *, elapsed: float, steps: int) -> None:
    """workdir/summary.json: the final validation metrics per organ with the run's loss and config.

    Written atomically, last, so its presence means the run finished.
    """
    organs = _named(summary["organs"], data.class_names)
    for k, name in enumerate(data.class_names[1:], start=1):
        organs[name]["share"] = float(data.shares[k])
    row = {
        "loss": config.loss.to_dict(),
        "steps": steps,
        "elapsed_s": elapsed,
        "mean_fg_dice": summary["mean_fg_dice"],
        "voxel_volume_ml": float(np.prod(data.spacing)) / 1000.0,
        "spacing_mm": list(data.spacing),
        "num_val_cases": data.num_val,
        "platform": jax.devices()[0].platform,
        "device_count": jax.device_count(),
        "organs": organs,
        "config": json.loads(config.to_json_best_effort()),
    }
    write_text_atomic(os.path.join(workdir, "summary.json"), json.dumps(row, indent=1, default=str))


def _mm(value: float, inf_cases: int) -> str:
    text = "n/a" if not np.isfinite(value) else f"{value:.2f}"
    return text + (f" ({inf_cases} inf)" if inf_cases else "")


def write_report(config, data: Data, workdir, summary, examples, *, elapsed: float, steps: int) -> None:
    """workdir/report.md (per-organ table with class shares) and workdir/predictions.png."""
    freqs = data.shares
    lines = [
        "# combo_jax training report",
        "",
        f"Data: {data.description}.",
        "",
        f"Loss `{config.loss.name}` ({', '.join(f'{k}={v}' for k, v in config.loss.items() if k != 'name')}); "
        f"{steps} steps, global batch {config.train.batch_size}, {jax.device_count()} device(s) "
        f"({jax.devices()[0].platform}), {elapsed / 60:.1f} min.",
        "",
        f"**Mean foreground Dice (validation, {data.num_val} cases): {summary['mean_fg_dice']:.4f}**",
        "",
        "| organ | share of voxels | Dice | precision | recall | false-positive voxels | false-negative voxels | "
        f"HD95 (mm) | mean surface distance (mm) | surface Dice at {config.eval.nsd_tolerance_mm:g} mm |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k, row in summary["organs"].items():
        lines.append(
            f"| {data.class_names[k]} | {freqs[k] * 100:.3f}% | {row['dice']:.4f} | {row['precision']:.4f} | "
            f"{row['recall']:.4f} | {row['fp_voxels']} | {row['fn_voxels']} | "
            f"{_mm(row['hd95_mm'], row['hd95_mm_inf_cases'])} | {_mm(row['msd_mm'], row['msd_mm_inf_cases'])} | "
            f"{row['nsd']:.4f} |"
        )
    lines += [
        "",
        f"Background: {freqs[0] * 100:.2f}% of voxels. Dice, precision and recall are dataset-level (voxel counts "
        "summed over the validation cases); surface metrics are means over cases, leaving out cases where the organ "
        "is missing from exactly one of prediction and truth (counted as \"inf\"). Predictions of a few validation "
        "cases: predictions.png.",
        "",
    ]
    with open(os.path.join(workdir, "report.md"), "w") as f:
        f.write("\n".join(lines))
    if examples:
        _plot_predictions(examples, os.path.join(workdir, "predictions.png"), data.slice_axis)


def _plot_predictions(examples, path, slice_axis: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(examples), 3, figsize=(9, 3 * len(examples)), squeeze=False)
    for row, (image, labels, pred) in zip(axes, examples):
        if image.ndim == 4:  # 3D: the middle slice along slice_axis
            mid = image.shape[slice_axis] // 2
            image, labels, pred = (np.take(a, mid, axis=slice_axis) for a in (image, labels, pred))
        for ax, data, title in zip(row, (image[..., 0], labels, pred), ("image", "ground truth", "prediction")):
            if title == "image":
                ax.imshow(data, cmap="gray")
            else:
                ax.imshow(data, cmap="tab10", vmin=0, vmax=9, interpolation="nearest")
            ax.set_title(title)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
