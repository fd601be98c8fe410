"""The runs of a study: one training per (loss or swept value, seed), each a ``python -m combo_jax.train``
command with its own workdir, and the config it must record."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

from combo_jax import config as config_lib


TRAIN_MODULE = "combo_jax.train"  # what each run starts: python -m TRAIN_MODULE


class StudyError(ValueError):
    """A study that cannot run or be reported as asked; raised before any training where it can be."""


@dataclasses.dataclass
class Run:
    """One training: its workdir, the ``combo_jax.train`` arguments, and the config it must record."""

    name: str
    workdir: str
    loss: str
    seed: int
    config_arg: str  # --config for combo_jax.train (a shipped name or an absolute path, optionally :loss)
    overrides: dict  # KEY -> text given as --config.KEY=text (the seed included)
    config: dict  # the config the run will build, as JSON
    param: str | None = None  # the swept key, for sweep runs
    value: Any = None  # the swept value

    def command(self) -> list[str]:
        return [sys.executable, "-m", TRAIN_MODULE, f"--config={self.config_arg}", f"--workdir={self.workdir}",
                *[f"--config.{k}={v}" for k, v in self.overrides.items()]]

    @property
    def summary_path(self) -> str:
        return os.path.join(self.workdir, "summary.json")

    @property
    def finished(self) -> bool:
        return os.path.isfile(self.summary_path)


def format_value(value: Any) -> str:
    """The text ``--config.KEY=`` is given for a parsed value (parsed back to the same value by ml_collections)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(format_value(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    return str(value)


def get_field(config, key: str) -> Any:
    value = config
    for part in key.split("."):
        value = value[part]
    return value


def _absolute_spec(spec: str) -> str:
    """``spec`` with a file path made absolute (runs start in their own workdir's context)."""
    target, sep, arg = spec.partition(":")
    if target.endswith(".py") or "/" in target or os.sep in target:
        target = os.path.abspath(target)
    return target + (sep + arg if sep else "")


def _load(spec: str, loss: str | None, overrides: dict):
    """The config a run of ``spec`` (with ``loss`` as its argument) and ``overrides`` builds."""
    target, sep, arg = spec.partition(":")
    if loss is not None and sep and arg != loss:
        raise StudyError(f"--config {spec!r} names loss {arg!r} but {loss!r} was asked for")
    full = f"{target}:{loss}" if loss is not None else spec
    try:
        return config_lib.load_config(full, [f"{k}={v}" for k, v in overrides.items()])
    except config_lib.ConfigError as err:
        raise StudyError(str(err)) from err


def _applicable(sets: dict, loss: str, spec: str) -> dict:
    """The ``--set`` keys that config ``spec:loss`` has (compare applies loss.X to the losses that take it)."""
    base = _load(spec, loss, {})
    return {k: v for k, v in sets.items() if not (k.startswith("loss.") and k.split(".", 1)[1] not in base.loss)}


def _check_sets(sets: dict, *, forbidden: Sequence[str]) -> None:
    for key in sets:
        if key in forbidden:
            raise StudyError(f"--set {key}=...: {key} is set by the study itself "
                             f"({'use --seeds' if key == 'seed' else 'use --param/--values'})")
        if key == "loss.name":
            raise StudyError("--set loss.name=...: choose losses with --losses (compare) or CONFIG:loss (sweep)")


def _json(config) -> dict:
    return json.loads(json.dumps(config_lib.as_json_tree(config)))


def plan_compare(*, config: str, losses: Sequence[str], seeds: Sequence[int], out: str, sets: dict) -> list[Run]:
    """One run per (loss, seed): ``out/runs/<loss>_seed<s>``, config ``get_config(loss)`` plus ``sets``."""
    _check_sets(sets, forbidden=("seed",))
    target, sep, arg = config.partition(":")
    if sep and list(losses) != [arg]:
        raise StudyError(f"--config {config!r} names a loss; give the losses of a comparison with --losses only")
    for name in losses:
        if name not in config_lib.LOSSES:
            raise StudyError(f"--losses: unknown loss {name!r}; expected some of {', '.join(config_lib.LOSSES)}")
    spec = _absolute_spec(target)
    used, runs = set(), []
    for loss in losses:
        applied = _applicable(sets, loss, spec)
        used |= applied.keys()
        for seed in seeds:
            overrides = {"seed": str(seed), **applied}
            name = f"{loss}_seed{seed}"
            runs.append(Run(name=name, workdir=os.path.abspath(os.path.join(out, "runs", name)), loss=loss, seed=seed,
                            config_arg=f"{spec}:{loss}", overrides=overrides,
                            config=_json(_load(spec, loss, overrides))))
    unused = {k for k in sets if k.startswith("loss.")} - used
    if unused:
        raise StudyError(f"--set {', '.join(sorted(unused))}: no loss of {', '.join(losses)} has that option")
    return runs


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=+-]", "-", text)


def plan_sweep(*, config: str, param: str, values: Sequence[str], seeds: Sequence[int], out: str, sets: dict):
    """One run per (value, seed). Returns (runs, base config, default value of ``param``, parsed values)."""
    _check_sets(sets, forbidden=("seed", param))
    if param in ("seed", "loss.name"):
        raise StudyError(f"--param {param}: " + ("seeds are given with --seeds" if param == "seed"
                                                  else "losses are compared with the compare command"))
    spec = _absolute_spec(config)
    base = _load(spec, None, sets)
    loss = base.loss.name
    try:
        config_lib.check_key(base, param)
    except config_lib.ConfigError as err:
        raise StudyError(f"--param {param}: {err}") from err
    default = get_field(base, param)
    parsed, texts = [], []
    for text in values:
        value = get_field(_load(spec, None, {**sets, param: text}), param)
        if value in parsed:
            raise StudyError(f"--values: {text!r} repeats the value {value!r}")
        parsed.append(value)
        texts.append(format_value(value))
    runs = []
    for value, text in zip(parsed, texts):
        for seed in seeds:
            overrides = {"seed": str(seed), **sets, param: text}
            name = f"{loss}_seed{seed}" if value == default else _safe(f"{loss}_{param}={text}_seed{seed}")
            runs.append(Run(name=name, workdir=os.path.abspath(os.path.join(out, "runs", name)), loss=loss, seed=seed,
                            config_arg=spec, overrides=overrides, config=_json(_load(spec, None, overrides)),
                            param=param, value=value))
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise StudyError(f"--values {','.join(values)}: two values give the same run name; use distinguishable values")
    return runs, base, default, parsed


def check_workdirs(runs: Sequence[Run]) -> None:
    """Refuses workdirs that hold a run of another configuration (a finished or a partial one)."""
    problems = []
    for run in runs:
        for record in ("summary.json", "experiment.json"):
            path = os.path.join(run.workdir, record)
            if not os.path.isfile(path):
                continue
            with open(path) as f:
                recorded = json.load(f).get("config")
            if recorded is None:
                continue
            diff = config_lib.differences(run.config, recorded)
            if diff:
                problems.append(f"{run.workdir} ({record}) holds a different run:\n    " + "\n    ".join(diff))
            break
    if problems:
        raise StudyError(
            "these workdirs hold runs trained with another configuration; use another --out or the same --set:\n  "
            + "\n  ".join(problems)
        )


def organ_names(config) -> tuple[str, ...]:
    """The organ (non-background) class names the config's data will report."""
    return tuple(config_lib.class_names(config)[1:])
