"""Configurations: the loss registry, loading a config by name or path with overrides, and every check that can
run before training starts.

A config is an ``ml_collections.ConfigDict`` built by a ``get_config(arg)`` in a Python file. ``--config`` names
one of the configs shipped with the package (``tiny``, ``default:dice``; they live in the repository's
``configs/`` folder and install as ``combo_jax.configs``) or a file (``path/to/config.py[:arg]``). Overrides are
``KEY=VALUE`` strings (``train.num_steps=400``) parsed by ml_collections' own command-line parser, so a value
means the same on ``train.py``'s command line and in an experiment's ``--set``.

Every mistake this module can see is a :class:`ConfigError` with one line naming the key, raised before anything
is written: an unknown key, a key given twice, an option the chosen loss does not take, a value out of range
(the loss's own argument checks run on the configured values), sizes that do not fit the model or the devices.
"""

from __future__ import annotations

import functools
import importlib.resources
import inspect
import json
import math
import os
import re
from collections.abc import Sequence
from typing import Any

import ml_collections

from combo_jax import losses

# The losses a config can name (config.loss.name), and the options each takes from config.loss.
LOSSES = {
    "combo": losses.combo_loss,
    "dice": losses.dice_loss,
    "wce": losses.weighted_cross_entropy,
    "dice_ce": losses.dice_ce_loss,
    "focal": losses.focal_loss,
    "tversky": losses.tversky_loss,
    "generalized_dice": losses.generalized_dice_loss,
}
# Arguments of a loss that are not options a config sets.
_NOT_CONFIGURABLE = ("logits", "labels", "where", "ignore_index", "reduction", "activation")

# Settings a resumed run may change: how long to train, how often to log, evaluate and save, how to evaluate,
# and where the data and its cache live. Everything else decides which batches and which updates the run made.
RESUMABLE = ("train.num_steps", "train.log_every", "train.eval_every", "train.checkpoint_every",
             "train.keep_checkpoints", "train.on_nonfinite", "train.eval_batch_size", "eval.", "data.root",
             "data.cache_dir", "model.remat")  # remat: what the backward pass recomputes, not the run's numbers


# Keys added to the config after runs were recorded without them, with the value that reproduces what such a run
# did: a saved run lacking the key matches a config holding this value (and no other).
INTRODUCED = {"loss.frequency_power": 0.0}


class ConfigError(ValueError):
    """A configuration that cannot run, found before any training work."""


def loss_options(name: str) -> dict:
    """The options a config may set for loss ``name``, with the function's defaults."""
    if name not in LOSSES:
        raise ConfigError(f"config.loss.name: unknown loss {name!r}; expected one of {', '.join(LOSSES)}")
    options = {p.name: p.default for p in inspect.signature(LOSSES[name]).parameters.values()
               if p.name not in _NOT_CONFIGURABLE and p.default is not inspect.Parameter.empty}
    if "class_weights" in options:
        # config.loss.frequency_power p: class weights w_k ~ f_k^-p (mean 1) that the trainer derives from the
        # training data's class frequencies f_k (losses.frequency_weights, see loss_kwargs); 0 turns them off.
        options["frequency_power"] = 0.0
    return options


# --------------------------------------------------------------------------------------------------
# Loading: a config by name or path, plus overrides
# --------------------------------------------------------------------------------------------------


def shipped_configs() -> tuple[str, ...]:
    """Names of the configs shipped with the package (``python -m combo_jax.train --config NAME``)."""
    folder = importlib.resources.files("combo_jax.configs")
    return tuple(sorted(p.name[:-3] for p in folder.iterdir() if p.name.endswith(".py") and not p.name.startswith("_")))


def resolve_config(spec: str) -> tuple[str, str | None]:
    """(file path, get_config argument or None) of ``--config`` ``NAME[:arg]`` or ``path.py[:arg]``."""
    if not spec:
        raise ConfigError("--config is empty: give a shipped config by name (e.g. tiny, default:dice) or a file")
    target, sep, arg = spec.partition(":")
    if target.endswith(".py") or os.sep in target or "/" in target:
        if not os.path.isfile(target):
            raise ConfigError(f"--config {spec!r}: no config file at {target!r}")
        return os.path.abspath(target), (arg if sep else None)
    names = shipped_configs()
    if target not in names:
        raise ConfigError(f"--config {spec!r}: no shipped config named {target!r} (shipped: {', '.join(names)}) and "
                          "no such file")
    path = importlib.resources.files("combo_jax.configs") / f"{target}.py"
    return str(path), (arg if sep else None)


def split_override(text: str) -> tuple[str, str]:
    """``KEY=VALUE`` (a leading ``config.`` is dropped) as (key, value text)."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if key.startswith("config."):
        key = key[len("config."):]
    if not sep or not key:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. train.num_steps=400")
    return key, value


def check_key(config: ml_collections.ConfigDict, key: str) -> None:
    """A ConfigError unless ``key`` names a field (not a section) of ``config``; loss options are named as such."""
    parts = key.split(".")
    section = config
    for depth, part in enumerate(parts):
        fields = list(section.keys()) if isinstance(section, ml_collections.ConfigDict) else []
        if part not in fields:
            if depth == 1 and parts[0] == "loss":
                name = config.loss.get("name")
                raise ConfigError(
                    f"config.{key} is not an option of loss {name!r} (its options: "
                    f"{', '.join(k for k in config.loss.keys() if k != 'name')}); to train another loss, name it in "
                    f"--config, e.g. --config=default:{'dice' if name != 'dice' else 'combo'}")
            where = "config" + "".join(f".{p}" for p in parts[:depth])
            raise ConfigError(f"config.{key}: {where} has no field {part!r} (its fields: {', '.join(fields)})")
        section = section[part]
    if isinstance(section, ml_collections.ConfigDict):
        raise ConfigError(f"config.{key} is a section; set one of its fields ({', '.join(section.keys())})")


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """The locked ConfigDict of ``spec`` with ``overrides`` (``KEY=VALUE`` strings) applied.

    The overrides go through ml_collections' own ``--config.KEY=VALUE`` parser (a value is parsed as the type of
    the field it replaces; tuples as ``(a, b)``). Before that, every key is checked: it must name a field of the
    config, and appear once (ml_collections would concatenate a repeated tuple flag).
    """
    from absl import flags
    from ml_collections import config_flags

    path, arg = resolve_config(spec)
    base = _load_file(path, arg, spec)
    pairs = [split_override(text) for text in overrides]
    seen = set()
    for key, _ in pairs:
        if key in seen:
            raise ConfigError(f"config.{key} is given more than once")
        seen.add(key)
        check_key(base, key)
    if base.get("loss") is not None and "loss.name" in seen:
        raise ConfigError("config.loss.name cannot be overridden (each loss has its own options): name the loss in "
                          "--config instead, e.g. --config=default:dice")
    argv = ["combo_jax", f"--config={path}{f':{arg}' if arg is not None else ''}",
            *[f"--config.{key}={value}" for key, value in pairs]]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True, sys_argv=argv)
    try:
        values(argv)
    except (flags.Error, ValueError, TypeError, KeyError, AttributeError) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"--config {spec!r}: {message}") from err
    return values.config


def _load_file(path: str, arg: str | None, spec: str) -> ml_collections.ConfigDict:
    """Runs ``get_config(arg)`` of the file, turning its failures into one-line errors."""
    import importlib.util

    name = "_combo_jax_config_" + re.sub(r"\W", "_", path)
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as err:  # noqa: BLE001 -- any failure of the user's file is reported as such
        raise ConfigError(f"--config {spec!r}: loading {path} failed: {type(err).__name__}: {err}") from err
    if not hasattr(module, "get_config"):
        raise ConfigError(f"--config {spec!r}: {path} has no get_config()")
    try:
        config = module.get_config(arg) if arg is not None else module.get_config()
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001
        raise ConfigError(f"--config {spec!r}: get_config({'' if arg is None else repr(arg)}) failed: "
                          f"{type(err).__name__}: {err}") from err
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"--config {spec!r}: get_config() returned {type(config).__name__}, not a ConfigDict")
    return config


# --------------------------------------------------------------------------------------------------
# What a config describes
# --------------------------------------------------------------------------------------------------


def class_names(config) -> tuple[str, ...]:
    """The classes the model predicts: background first, then the organs (derived from the data section)."""
    if config.data.name == "phantom":
        from combo_jax.data import phantom

        return phantom.CLASS_NAMES
    return ("background", *config.data.organs)


def num_classes(config) -> int:
    return len(class_names(config))


def flatten(tree: dict) -> dict:
    """A nested config dict (e.g. a config.json) as ``{"data.shape": ..., "loss.beta": ...}``."""
    from flax import traverse_util

    return traverse_util.flatten_dict(tree, sep=".") if tree else {}


def as_json_tree(config) -> dict:
    """The config as plain JSON values (tuples become lists), as config.json and summary.json record it."""
    if isinstance(config, ml_collections.ConfigDict):
        return json.loads(config.to_json_best_effort())
    return json.loads(json.dumps(config, default=str))


def differences(expected, recorded, *, allowed: Sequence[str] = ()) -> list[str]:
    """``config.KEY: recorded R, now E`` for every field whose values differ, except keys under ``allowed``.

    A key present on one side only counts as a difference, unless the recorded config predates the key
    (``INTRODUCED``) and the expected value is the one runs made before it had; ``allowed`` entries ending in
    ``.`` cover a section.
    """
    a, b = flatten(as_json_tree(expected)), flatten(as_json_tree(recorded))
    changed = []
    for key in sorted(a.keys() | b.keys()):
        if any(key == c or (c.endswith(".") and key.startswith(c)) for c in allowed):
            continue
        if key not in b and key in INTRODUCED and a[key] == INTRODUCED[key]:
            continue
        if a.get(key, "(absent)") != b.get(key, "(absent)"):
            changed.append(f"config.{key}: {b.get(key, '(absent)')!r} in the saved run, {a.get(key, '(absent)')!r} now")
    return changed


def read_saved_config(workdir: str) -> dict | None:
    """The workdir's config.json as a dict, None when absent; a ConfigError when unreadable."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path} cannot be read ({err}); it records the run's configuration. Restore it, or move "
                          "the workdir aside and start a new run") from err
    if not isinstance(saved, dict):
        raise ConfigError(f"{path} does not hold a configuration (a JSON object)")
    return saved


def check_resume(config, workdir: str, *, has_checkpoints: bool) -> None:
    """Refuses to resume a workdir whose checkpoints were made with a different configuration.

    Resuming restores the data iterator and the optimizer state; with another seed, dataset, model, loss,
    optimizer or batch size the restored state would not belong to the run, so any such difference is an error
    naming the fields. Training longer (``train.num_steps``) or logging, evaluating and saving at other
    intervals is allowed. Checkpoints without a readable config.json are refused too: nothing could tell
    whether they belong to this configuration.
    """
    saved = read_saved_config(workdir)
    if not has_checkpoints:
        return
    if saved is None:
        raise ConfigError(f"workdir {workdir!r} holds checkpoints but no config.json, so nothing shows which "
                          "configuration they belong to; restore config.json, or use a new workdir")
    changed = differences(config, saved, allowed=RESUMABLE)
    if changed:
        raise ConfigError(
            f"workdir {workdir!r} holds checkpoints of a run with a different configuration ({'; '.join(changed)}). "
            "Rerun with the run's own settings to resume it, or use a new workdir for a new run."
        )


# --------------------------------------------------------------------------------------------------
# Checks before any work
# --------------------------------------------------------------------------------------------------


def _number(config, key: str, *, minimum=None, above=None, maximum=None, integer=False) -> None:
    section, _, field = key.rpartition(".")
    value = config
    for part in key.split("."):
        value = value[part]
    kind = "an integer" if integer else "a number"
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or (not integer and not math.isfinite(value)):
        raise ConfigError(f"config.{key} must be {kind}, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"config.{key} must be >= {minimum}, got {value!r}")
    if above is not None and value <= above:
        raise ConfigError(f"config.{key} must be > {above}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"config.{key} must be <= {maximum}, got {value!r}")


def _choice(config, key: str, choices: Sequence[str]) -> None:
    value = config
    for part in key.split("."):
        value = value[part]
    if value not in choices:
        raise ConfigError(f"config.{key} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def check_loss(config) -> None:
    """The loss section: a known loss, only its options, and values its own argument checks accept.

    The loss is traced once on small abstract inputs (``jax.eval_shape``, nothing is computed), so ranges are
    checked by the loss function itself: one definition of what a valid ``beta`` or ``class_weights`` is.
    """
    import jax
    import jax.numpy as jnp

    loss = config.loss
    if loss.get("name") not in LOSSES:
        raise ConfigError(f"config.loss.name: unknown loss {loss.get('name')!r}; expected one of {', '.join(LOSSES)}")
    accepted = loss_options(loss.name)
    for key in loss.keys():
        if key != "name" and key not in accepted:
            raise ConfigError(
                f"config.loss.{key} is not an option of loss {loss.name!r} (its options: {', '.join(accepted)}); "
                f"to train another loss, name it in --config, e.g. --config=default:{loss.name}")
    k = num_classes(config)
    dims = config.data.spatial_dims if config.data.spatial_dims in (2, 3) else 2
    logits = jax.ShapeDtypeStruct((1, *(2,) * dims, k), jnp.float32)
    labels = jax.ShapeDtypeStruct((1, *(2,) * dims), jnp.int32)
    fn = functools.partial(LOSSES[loss.name], **_loss_options(config))
    try:
        jax.eval_shape(fn, logits, labels)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"config.loss ({loss.name}): {str(err).splitlines()[0]}") from err
    if "frequency_power" in loss:
        _number(config, "loss.frequency_power", minimum=0.0)
        if loss.frequency_power > 0 and loss.get("class_weights") is not None:
            raise ConfigError(f"config.loss.class_weights and config.loss.frequency_power={loss.frequency_power} both "
                              "set the class weights; set config.loss.frequency_power=0 to give your own")


def _loss_options(config) -> dict:
    """config.loss's options of the loss function as given (tuples for sequences)."""
    options = {k: v for k, v in config.loss.items() if k not in ("name", "frequency_power")}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}


def loss_kwargs(config, class_frequencies=None) -> dict:
    """The keyword arguments config.loss gives its loss function (tuples for sequences).

    With ``config.loss.frequency_power`` above 0, ``class_weights`` comes from ``class_frequencies``, the
    training data's fraction of voxels per class (required then).
    """
    options = _loss_options(config)
    power = config.loss.get("frequency_power", 0.0)
    if power > 0:
        if class_frequencies is None:
            raise ConfigError(f"config.loss.frequency_power={power} needs the training data's class frequencies")
        options["class_weights"] = tuple(float(w) for w in losses.frequency_weights(class_frequencies, power=power))
    return options


def check_config(config, *, num_devices: int, num_processes: int = 1) -> None:
    """Every check of a config that needs no data and no workdir; raises ConfigError naming the key."""
    d = config.data
    _choice(config, "data.name", ("phantom", "nifti"))
    if d.spatial_dims not in (2, 3) or d.spatial_dims != len(d.shape):
        raise ConfigError(f"config.data.spatial_dims={d.spatial_dims} must be 2 or 3 and match config.data.shape="
                          f"{tuple(d.shape)}")
    if "num_classes" in config.model:
        raise ConfigError("config.model.num_classes is derived from the data (background plus config.data.organs); "
                          "remove it from the config")
    check_loss(config)
    m = config.model
    if len(m.features) < 2 or any(not isinstance(f, int) or f < 1 for f in m.features):
        raise ConfigError(f"config.model.features={tuple(m.features)} must be two or more positive widths")
    _choice(config, "model.norm", ("instance", "group"))
    _choice(config, "model.dtype", ("float32", "bfloat16"))
    from combo_jax.models.unet import REMAT_POLICIES

    if not (isinstance(m.remat, bool) or m.remat in REMAT_POLICIES):
        raise ConfigError(f"config.model.remat must be one of {', '.join(map(repr, REMAT_POLICIES))}, got {m.remat!r}")
    divisor = 2 ** (len(m.features) - 1)
    shapes = {"config.data.shape": tuple(d.shape)}
    if d.name == "nifti":
        shapes["config.eval.window"] = tuple(config.eval.window)
        if len(config.eval.window) != d.spatial_dims:
            raise ConfigError(f"config.eval.window={tuple(config.eval.window)} must have {d.spatial_dims} sizes "
                              "(config.data.spatial_dims)")
        _number(config, "eval.overlap", minimum=0.0)
        if not config.eval.overlap < 1.0:
            raise ConfigError(f"config.eval.overlap={config.eval.overlap} must be in [0, 1)")
        if len(d.label_ids) != len(d.organs) or not d.organs:
            raise ConfigError(f"config.data.label_ids={tuple(d.label_ids)} must give one dataset label id per organ "
                              f"in config.data.organs={tuple(d.organs)} (at least one)")
        if len(set(d.label_ids)) != len(d.label_ids):
            repeated = sorted({i for i in d.label_ids if list(d.label_ids).count(i) > 1})
            raise ConfigError(f"config.data.label_ids={tuple(d.label_ids)} names label id(s) {repeated} for more "
                              "than one organ")
        if len(set(d.organs)) != len(d.organs):
            raise ConfigError(f"config.data.organs={tuple(d.organs)} repeats an organ name")
        if 0 in d.label_ids:
            raise ConfigError(f"config.data.label_ids={tuple(d.label_ids)}: 0 is the background, not an organ")
        _choice(config, "data.modality", ("CT", "MRI"))
        _number(config, "data.foreground_fraction", minimum=0.0, maximum=1.0)
        from combo_jax.data import pipeline

        known = set(inspect.signature(pipeline.Augment).parameters)
        unknown = sorted(set(d.augment.keys()) - known)
        if unknown:
            raise ConfigError(f"config.data.augment has unknown options {unknown}; the options are "
                              f"{', '.join(sorted(known))}")
        try:
            pipeline.Augment(**{k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in d.augment.items()})
        except (TypeError, ValueError) as err:
            raise ConfigError(f"config.data.augment: {err}") from err
    for name, shape in shapes.items():
        if any(not isinstance(s, int) or s <= 0 or s % divisor for s in shape):
            raise ConfigError(f"{name}={shape}: every size must be a positive multiple of 2^(levels-1) = {divisor} "
                              f"for config.model.features={tuple(m.features)}")
    for key in ("num_train", "worker_count"):
        _number(config, f"data.{key}", minimum=1 if key == "num_train" else 0, integer=True)
    if d.name == "phantom":
        _number(config, "data.num_val", minimum=1, integer=True)
    for name in ("batch_size", "eval_batch_size"):
        size = config.train[name]
        if not isinstance(size, int) or size <= 0 or size % num_devices or size % num_processes:
            raise ConfigError(
                f"config.train.{name}={size} must be a positive multiple of the device count ({num_devices}) and of "
                f"the process count ({num_processes}): each global batch is split evenly over devices")
    if d.name == "phantom" and d.num_val % config.train.eval_batch_size:
        raise ConfigError(f"config.data.num_val={d.num_val} must be a multiple of config.train.eval_batch_size="
                          f"{config.train.eval_batch_size} so that every validation case is evaluated")
    for key in ("num_steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
        _number(config, f"train.{key}", minimum=1, integer=True)
    _choice(config, "train.on_nonfinite", ("stop", "skip"))
    o = config.optimizer
    _choice(config, "optimizer.name", ("adamw", "sgd"))
    _number(config, "optimizer.learning_rate", above=0.0)
    _number(config, "optimizer.warmup_steps", minimum=0, integer=True)
    _number(config, "optimizer.final_lr_fraction", minimum=0.0, maximum=1.0)
    _number(config, "optimizer.weight_decay", minimum=0.0)
    _number(config, "optimizer.clip_norm", above=0.0)
    if o.name == "sgd":
        _number(config, "optimizer.momentum", minimum=0.0, maximum=1.0)
        _number(config, "optimizer.poly_power", above=0.0)
    _number(config, "eval.num_predictions", minimum=0, integer=True)
    _number(config, "eval.nsd_tolerance_mm", above=0.0)
    _number(config, "seed", minimum=0, integer=True)
