"""Studies over many trainings: the loss comparison and the alpha/beta sweeps, with tables, plots and targets.

    python -m combo_jax.experiments compare --config configs/default.py --seeds 3 --out runs/study
    python -m combo_jax.experiments sweep --config configs/default.py --param loss.beta \\
        --values 0.1,0.3,0.5,0.7,0.9 --seeds 3 --out runs/study --target "recall>=0.95:pancreas"
    python -m combo_jax.experiments losses      # each loss's default options

**Runs.** Every run is an independent ``python train.py --config ... --workdir DIR/runs/NAME --config.seed=S
[--config.KEY=VALUE ...]`` subprocess, so a study is exactly the trainings a user could start by hand.
The runs share JAX's persistent compilation cache
(``OUT/jax_cache``; ``--compile-cache``), so only the first run of a setting pays for most compilations.
``compare`` names its runs ``<loss>_seed<S>``; ``sweep`` names them ``<loss>_<param>=<value>_seed<S>``, except
that a point equal to the config's own value (beta = 0.5 for the Combo loss) *is* the compare run
``<loss>_seed<S>`` and is trained once for both, when the two commands share ``--out`` and ``--set``.

**Seeds.** ``--seeds N`` trains seeds 0 .. N-1 (``--first-seed`` shifts them). The seed sets ``config.seed``:
the model's initial parameters and the order of the training batches. ``config.data.seed`` stays fixed, so
every run trains on the same cases and is scored on the same validation cases: the spread over seeds is the
spread of training, not of the data.

**Resume.** A run whose workdir holds ``summary.json`` is finished and skipped; any other run is started again
and resumes from its checkpoints. Before anything trains, each workdir's recorded configuration
(``experiment.json``, written at launch, and ``summary.json``) is compared with the one this command would
train; a mismatch (say, a different ``--set``) is an error naming the run and the fields, never a silent mix.
Ctrl-C or SIGTERM to the study asks every running training to save a checkpoint and stop;
rerunning the command resumes them. After a study, rerunning the same command trains nothing and rewrites the
tables, so ``--target`` can be changed freely on a finished sweep. ``--dry-run`` lists the runs and commands.

**Devices.** ``--parallel P`` runs up to P trainings at once. On GPUs (``--devices auto`` finds them with
``nvidia-smi`` or ``CUDA_VISIBLE_DEVICES``, or give ids: ``--devices 0,1,2,3``) run i gets
``CUDA_VISIBLE_DEVICES`` of one GPU, round-robin; P defaults to the number of GPUs, and with more runs than GPUs
each shares its GPU (memory preallocation is then turned off). On a CPU P defaults to 1, which gives the one
run every core; with P > 1 the cores are split into P disjoint sets and each run is pinned to one set
(``sched_setaffinity``; XLA's CPU thread pools follow that set), so P runs never compete for a core. A
run pinned to fewer cores is slower; whether P runs of c/P cores beat one run of c cores depends on the model
size (small models, whose steps are dominated by per-step overhead, gain). On a TPU host leave P at 1.

**Outputs** in ``--out``: ``compare.md`` / ``compare.csv`` (per organ and loss: Dice mean +- sample std over
seeds, precision, recall, false-positive and false-negative volume in ml, HD95, and the same summarized over
the small organs and over all organs), ``compare_runs.csv`` (one row per run and organ),
``sweep_<param>.md`` / ``.csv`` / ``_runs.csv`` / ``.png`` (false positives, false negatives, precision and
recall per organ against the swept value), and ``study.json`` (for every invocation: the command, the runs and
what happened to each, the hardware, the wall time). Every row carries the loss name and options that its runs
recorded in their own ``summary.json``; nothing in a table is taken from the command line.

**Targets** (``sweep --target``, repeatable): ``METRIC OP THRESHOLD : SCOPE``, e.g. ``recall>=0.95:pancreas``
or ``fp_ml<=0.5:all``. METRIC is one of ``TARGET_METRICS`` (``fp_ml``/``fn_ml`` are volumes in ml), OP one of
``>= <= > <``, SCOPE an organ name, ``all`` (every organ must meet it) or ``small`` (every organ under the
small-organ share). A swept value meets the target when the mean over seeds of the metric meets it for every
organ in scope. Of the values that meet it the one with the best mean foreground Dice is chosen; if none does,
the one with the smallest worst shortfall (in the metric's units). The report then lists what the choice costs
against the config's own value of the swept key (beta = 0.5 for the Combo loss): the change in Dice, precision,
recall and false-positive and false-negative volume of every organ. A sweep varies one key; to choose beta and
alpha, run the target on each sweep.
"""

from __future__ import annotations

import argparse
import ast
import csv
import dataclasses
import datetime
import importlib.util
import json
import math
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from combo_jax import study_stats

ALL_LOSSES = ("dice", "wce", "combo", "dice_ce", "focal", "tversky", "generalized_dice")
SMALL_SHARE = 0.005  # organs under 0.5% of the validation voxels form the "small organs" block
TARGET_METRICS = ("dice", "precision", "recall", "fp_ml", "fn_ml", "fp_voxels", "fn_voxels", "hd95_mm", "msd_mm", "nsd")
TABLE_METRICS = ("dice", "precision", "recall", "fp_ml", "fn_ml", "hd95_mm", "msd_mm", "nsd")
_OPS = {">=": lambda a, b: a >= b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b, "<": lambda a, b: a < b}
_TRAIN_PY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train.py")


class StudyError(ValueError):
    """A study that cannot run or be reported as asked; raised before any training where it can be."""


# --------------------------------------------------------------------------------------------------
# Configs and overrides
# --------------------------------------------------------------------------------------------------


def load_config(spec: str, *, loss: str | None = None):
    """The ConfigDict of ``spec`` (``path.py`` or ``path.py:loss``), as ``train.py --config`` would build it.

    ``loss`` (if given) is passed to ``get_config``; a loss in ``spec`` and a different ``loss`` is an error.
    """
    path, _, suffix = spec.partition(":")
    if suffix and loss is not None and suffix != loss:
        raise StudyError(f"--config {spec!r} names loss {suffix!r} but {loss!r} was asked for")
    loss = loss if loss is not None else (suffix or None)
    if not os.path.isfile(path):
        raise StudyError(f"--config: no config file at {path!r}")
    module_name = "_study_config_" + re.sub(r"\W", "_", os.path.abspath(path))
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise StudyError(f"--config {path!r} has no get_config()")
    try:
        return module.get_config(loss) if loss is not None else module.get_config()
    except TypeError as err:
        raise StudyError(f"--config {path!r}: get_config({loss!r}) failed ({err}); a study needs get_config(loss)") from err


def parse_value(text: str, current: Any, *, key: str) -> Any:
    """``text`` parsed as the type of the field's current value, as ``--config.KEY=text`` would be.

    bool: true/false/1/0/yes/no; int; float; tuple: a Python literal (``(8, 16)`` or ``8,16``); str: as is;
    a None field: a Python literal if ``text`` is one, else the string.
    """
    import ml_collections

    if isinstance(current, ml_collections.ConfigDict):
        raise StudyError(f"{key} is a config section; set one of its fields ({', '.join(current.keys())})")
    try:
        if isinstance(current, bool):
            lowered = text.strip().lower()
            if lowered in ("true", "t", "1", "yes"):
                return True
            if lowered in ("false", "f", "0", "no"):
                return False
            raise ValueError("expected true or false")
        if isinstance(current, int):
            return int(text)
        if isinstance(current, float):
            return float(text)
        if isinstance(current, (tuple, list)):
            value = ast.literal_eval(text)
            return tuple(value) if isinstance(value, (tuple, list)) else (value,)
        if isinstance(current, str):
            return text
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text
    except (ValueError, SyntaxError) as err:
        raise StudyError(f"{key}={text!r}: not a valid {type(current).__name__} like the config's {current!r} ({err})") from err


def format_value(value: Any) -> str:
    """The text ``train.py`` is given for a parsed value (parsed back to the same value by ml_collections)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _lookup(config, key: str):
    """(section, field) of a dotted key; an error listing the fields when a part is missing."""
    parts = key.split(".")
    section = config
    for depth, part in enumerate(parts):
        keys = list(section.keys()) if hasattr(section, "keys") else []
        if part not in keys:
            where = ".".join(parts[:depth]) or "the config"
            raise StudyError(f"{key}: {where} has no field {part!r} (its fields: {', '.join(keys)})")
        if depth < len(parts) - 1:
            section = section[part]
    return section, parts[-1]


def get_field(config, key: str) -> Any:
    section, field = _lookup(config, key)
    return section[field]


def set_field(config, key: str, text: str) -> Any:
    """Parses ``text`` as the field's type, sets it and returns the parsed value."""
    section, field = _lookup(config, key)
    value = parse_value(text, section[field], key=key)
    with section.ignore_type():
        section[field] = value
    return value


def parse_assignment(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise StudyError(f"--set {text!r}: expected KEY=VALUE, e.g. train.num_steps=400")
    key = key.strip()
    if key.startswith("config."):
        key = key[len("config."):]
    return key, value.strip()


def _json_tree(tree: Any) -> Any:
    return json.loads(json.dumps(tree, default=str))


def config_differences(expected: dict, recorded: dict) -> list[str]:
    """``key: recorded -> expected`` for every field both have and that differs (after a JSON round trip)."""
    from combo_jax.training import flatten_config

    a, b = flatten_config(_json_tree(expected)), flatten_config(_json_tree(recorded))
    return [f"{k}: recorded {b[k]!r}, this command {a[k]!r}" for k in sorted(a.keys() & b.keys()) if a[k] != b[k]]


def organ_names(config) -> tuple[str, ...] | None:
    """The organ (non-background) class names the config's data will report, when known before training."""
    if config.data.name == "phantom":
        from combo_jax.data import phantom

        return tuple(phantom.CLASS_NAMES[1:])
    organs = config.data.get("organs") if hasattr(config.data, "get") else None
    return tuple(organs) if organs else None


# --------------------------------------------------------------------------------------------------
# Targets: METRIC OP THRESHOLD : SCOPE
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Target:
    """A goal for the swept value, e.g. ``recall>=0.95:pancreas`` or ``fp_ml<=0.5:all``."""

    metric: str
    op: str
    threshold: float
    scope: str  # an organ name, "all" or "small"
    text: str

    def met(self, value: float) -> bool:
        """Whether a metric value meets the target (a missing value, nan, never does)."""
        return not math.isnan(value) and _OPS[self.op](value, self.threshold)

    def shortfall(self, value: float) -> float:
        """How far ``value`` is from meeting the target, in the metric's units (0 when met; inf for n/a)."""
        if math.isnan(value):
            return math.inf
        if self.met(value):
            return 0.0
        return abs(value - self.threshold)


_TARGET_RE = re.compile(r"^\s*([A-Za-z_0-9]+)\s*(>=|<=|>|<)\s*([^:\s]+)\s*:\s*(\S.*?)\s*$")


def parse_target(text: str, *, organs: Sequence[str] | None = None) -> Target:
    """Parses ``METRIC OP THRESHOLD : SCOPE`` (spaces optional); ``organs``, if given, are the valid organ scopes."""
    m = _TARGET_RE.match(text)
    if not m:
        raise StudyError(
            f"--target {text!r}: expected METRIC OP THRESHOLD:SCOPE, e.g. 'recall>=0.95:pancreas' or 'fp_ml<=0.5:all' "
            f"(OP one of >= <= > <; SCOPE an organ name, 'all' or 'small')"
        )
    metric, op, threshold_text, scope = m.groups()
    metric = metric.lower()
    if metric not in TARGET_METRICS:
        raise StudyError(f"--target {text!r}: unknown metric {metric!r}; expected one of {', '.join(TARGET_METRICS)}")
    try:
        threshold = float(threshold_text)
    except ValueError:
        raise StudyError(f"--target {text!r}: threshold {threshold_text!r} is not a number") from None
    if not math.isfinite(threshold):
        raise StudyError(f"--target {text!r}: threshold must be finite")
    if scope not in ("all", "small") and organs is not None and scope not in organs:
        raise StudyError(f"--target {text!r}: unknown organ {scope!r}; expected 'all', 'small' or one of {', '.join(organs)}")
    return Target(metric, op, threshold, scope, text.strip())


# --------------------------------------------------------------------------------------------------
# The run plan
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    """One training: its workdir, the train.py arguments, and the config it must record."""

    name: str
    workdir: str
    loss: str
    seed: int
    config_arg: str  # --config for train.py (absolute path, optionally :loss)
    overrides: dict  # KEY -> text given as --config.KEY=text (the seed included)
    config: dict  # the config train.py will build, as JSON
    param: str | None = None  # the swept key, for sweep runs
    value: Any = None  # the swept value

    def command(self) -> list[str]:
        return [sys.executable, _TRAIN_PY, f"--config={self.config_arg}", f"--workdir={self.workdir}",
                *[f"--config.{k}={v}" for k, v in self.overrides.items()]]

    @property
    def summary_path(self) -> str:
        return os.path.join(self.workdir, "summary.json")

    @property
    def finished(self) -> bool:
        return os.path.isfile(self.summary_path)


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=+-]", "-", text)


def _base_config(spec: str, loss: str | None, sets: dict):
    """The loaded config with ``--set`` applied; returns (config, {key: text}) with only the keys it has."""
    config = load_config(spec, loss=loss)
    applied = {}
    for key, text in sets.items():
        if key.startswith("loss.") and key.split(".")[1] not in config.loss:
            continue  # an option of another loss (compare applies loss.X to the losses that take it)
        applied[key] = format_value(set_field(config, key, text))
    return config, applied


def _check_sets(sets: dict, *, forbidden: Sequence[str]) -> None:
    for key in sets:
        if key in forbidden:
            raise StudyError(f"--set {key}=...: {key} is set by the study itself ({'seed: use --seeds' if key == 'seed' else 'use --param/--values'})")
        if key == "loss.name":
            raise StudyError("--set loss.name=...: choose losses with --losses (compare) or CONFIG:loss (sweep)")


def plan_compare(*, config: str, losses: Sequence[str], seeds: Sequence[int], out: str, sets: dict) -> list[Run]:
    """One run per (loss, seed): ``out/runs/<loss>_seed<s>``, config ``get_config(loss)`` plus ``sets``."""
    _check_sets(sets, forbidden=("seed",))
    path, _, suffix = config.partition(":")
    if suffix and list(losses) != [suffix]:
        raise StudyError(f"--config {config!r} names a loss; give the losses of a comparison with --losses only")
    for name in losses:
        if name not in ALL_LOSSES:
            raise StudyError(f"--losses: unknown loss {name!r}; expected some of {', '.join(ALL_LOSSES)}")
    loss_keys = {k for k in sets if k.startswith("loss.")}
    used = set()
    runs = []
    for loss in losses:
        base, applied = _base_config(path, loss, sets)
        used |= applied.keys()
        for seed in seeds:
            cfg = base.copy_and_resolve_references()
            cfg.seed = seed
            runs.append(Run(
                name=f"{loss}_seed{seed}", workdir=os.path.abspath(os.path.join(out, "runs", f"{loss}_seed{seed}")),
                loss=loss, seed=seed, config_arg=f"{os.path.abspath(path)}:{loss}",
                overrides={"seed": str(seed), **applied}, config=_json_tree(cfg.to_dict()),
            ))
    unused = loss_keys - used
    if unused:
        raise StudyError(f"--set {', '.join(sorted(unused))}: no loss of {', '.join(losses)} has that option")
    return runs


def plan_sweep(*, config: str, param: str, values: Sequence[str], seeds: Sequence[int], out: str, sets: dict):
    """One run per (value, seed). Returns (runs, base config, default value of ``param``, parsed values)."""
    _check_sets(sets, forbidden=("seed", param))
    if param in ("seed", "loss.name"):
        raise StudyError(f"--param {param}: " + ("seeds are given with --seeds" if param == "seed" else "losses are compared with the compare command"))
    path, _, suffix = config.partition(":")
    base, applied = _base_config(path, suffix or None, sets)
    unused = set(sets) - set(applied)
    if unused:
        raise StudyError(f"--set {', '.join(sorted(unused))}: loss {base.loss.name!r} has no such option")
    loss = base.loss.name
    default = get_field(base, param)
    parsed = []
    for text in values:
        probe = base.copy_and_resolve_references()
        value = set_field(probe, param, text)
        if value in parsed:
            raise StudyError(f"--values: {text!r} repeats the value {value!r}")
        parsed.append(value)
    runs = []
    for value in parsed:
        for seed in seeds:
            cfg = base.copy_and_resolve_references()
            set_field(cfg, param, format_value(value))
            cfg.seed = seed
            name = f"{loss}_seed{seed}" if value == default else _safe(f"{loss}_{param}={format_value(value)}_seed{seed}")
            runs.append(Run(
                name=name, workdir=os.path.abspath(os.path.join(out, "runs", name)), loss=loss, seed=seed,
                config_arg=os.path.abspath(path) + (f":{suffix}" if suffix else ""),
                overrides={"seed": str(seed), **applied, param: format_value(value)},
                config=_json_tree(cfg.to_dict()), param=param, value=value,
            ))
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
            diff = config_differences(run.config, recorded)
            if diff:
                problems.append(f"{run.workdir} ({record}) holds a different run:\n    " + "\n    ".join(diff))
            break
    if problems:
        raise StudyError(
            "these workdirs hold runs trained with another configuration; use another --out or the same --set:\n  "
            + "\n  ".join(problems)
        )


# --------------------------------------------------------------------------------------------------
# Devices and the runner
# --------------------------------------------------------------------------------------------------


def detect_gpus() -> list[str]:
    """GPU ids from CUDA_VISIBLE_DEVICES, else from nvidia-smi; [] when there are none."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [v.strip() for v in visible.split(",") if v.strip()]
        return [] if ids and ids[0] == "-1" else ids
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


@dataclasses.dataclass
class Slot:
    """Where one concurrent run goes: environment changes and, on a CPU, the cores it is pinned to."""

    index: int
    env: dict
    cores: tuple[int, ...] | None = None

    def describe(self) -> str:
        parts = [f"{k}={v}" for k, v in self.env.items()]
        if self.cores is not None:
            parts.append(f"cores {','.join(map(str, self.cores))}")
        return " ".join(parts) or "all devices"


def make_slots(*, devices: str, parallel: int | None) -> list[Slot]:
    """``parallel`` slots over ``devices`` ("auto", "cpu", or comma-separated GPU ids)."""
    gpus = detect_gpus() if devices == "auto" else ([] if devices == "cpu" else [d.strip() for d in devices.split(",") if d.strip()])
    if gpus:
        parallel = parallel or len(gpus)
        if parallel < 1:
            raise StudyError(f"--parallel must be at least 1, got {parallel}")
        shared = parallel > len(gpus)
        return [Slot(i, {"CUDA_VISIBLE_DEVICES": gpus[i % len(gpus)],
                         **({"XLA_PYTHON_CLIENT_PREALLOCATE": "false"} if shared else {})}) for i in range(parallel)]
    parallel = parallel or 1
    if parallel < 1:
        raise StudyError(f"--parallel must be at least 1, got {parallel}")
    env = {"JAX_PLATFORMS": "cpu"} if devices == "cpu" else {}
    if parallel == 1 or not hasattr(os, "sched_getaffinity"):
        return [Slot(i, dict(env)) for i in range(parallel)]
    cores = sorted(os.sched_getaffinity(0))
    if parallel > len(cores):
        raise StudyError(f"--parallel {parallel} is more than the {len(cores)} CPU cores this process may use")
    chunks = np.array_split(np.asarray(cores), parallel)
    return [Slot(i, dict(env), tuple(int(c) for c in chunk)) for i, chunk in enumerate(chunks)]


_PROBE = (
    "import json, jax; d = jax.devices(); "
    "print(json.dumps({'platform': d[0].platform, 'device_count': len(d), 'device_kinds': sorted({x.device_kind for x in d}), "
    "'jax': jax.__version__}))"
)


def host_info() -> dict:
    info = {"python": platform.python_version(), "os": platform.platform(), "cpu_count": os.cpu_count()}
    if hasattr(os, "sched_getaffinity"):
        info["usable_cpus"] = len(os.sched_getaffinity(0))
    try:
        with open("/proc/cpuinfo") as f:
            models = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if models:
            info["cpu_model"] = models[0]
    except OSError:
        pass
    return info


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def _last_step(workdir: str) -> int:
    try:
        with open(os.path.join(workdir, "metrics.jsonl"), "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4096))
            lines = f.read().decode(errors="replace").splitlines()
        return int(json.loads(lines[-1])["step"])
    except (OSError, ValueError, KeyError, IndexError):
        return 0


class _Stop(Exception):
    pass


def compile_cache_env(cache_dir: str | None) -> dict:
    """Environment for JAX's persistent compilation cache in ``cache_dir`` (every compilation kept), or {}.

    The runs of a study compile the same functions (initialization, evaluation, and the whole train step for
    every seed of a setting), so all but the first take them from the cache: on a 2-core CPU this cuts a tiny
    run from about 19 s to 7 s of CPU time. A cache the user configured (JAX_COMPILATION_CACHE_DIR) is left alone.
    """
    if not cache_dir or "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return {}
    return {"JAX_COMPILATION_CACHE_DIR": os.path.abspath(cache_dir), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def run_study(runs: Sequence[Run], *, slots: Sequence[Slot], out: str, argv: Sequence[str], progress_every: float = 60.0,
              compile_cache: str | None = None, log=print) -> dict:
    """Trains every unfinished run, up to len(slots) at once; appends this invocation to ``out/study.json``.

    ``compile_cache``: a folder for JAX's persistent compilation cache shared by the runs (None: no cache).
    Returns the invocation record. Raises StudyError listing the runs that failed or did not finish.
    """
    started_at = time.time()
    cache_env = compile_cache_env(compile_cache)
    record = {
        "command": "python -m combo_jax.experiments " + shlex.join(argv),
        "cwd": os.getcwd(),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "parallel": len(slots),
        "slots": [s.describe() for s in slots],
        "compile_cache": cache_env.get("JAX_COMPILATION_CACHE_DIR", os.environ.get("JAX_COMPILATION_CACHE_DIR")),
        "host": host_info(),
        "runs": [],
    }
    entries = {r.name: {"name": r.name, "workdir": r.workdir, "seed": r.seed, "loss": r.loss,
                        "command": shlex.join(r.command()), "status": "pending"} for r in runs}
    todo = []
    for run in runs:
        if run.finished:
            entries[run.name]["status"] = "skipped (finished)"
            log(f"skip {run.name}: finished ({run.summary_path})")
        else:
            todo.append(run)
    total = len(entries)
    done = total - len(todo)
    log(f"study: {total} runs, {done} already finished, {len(todo)} to train on {len(slots)} slot(s) "
        f"({'; '.join(s.describe() for s in slots)})")

    probe = None
    if todo:  # the jax devices a run sees, asked in a separate process so this one never claims a GPU
        env = {**os.environ, **slots[0].env}
        probe = subprocess.Popen([sys.executable, "-c", _PROBE], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                 text=True, env=env)

    def on_term(signum, frame):
        raise _Stop()

    previous = signal.signal(signal.SIGTERM, on_term)
    running = {}  # slot index -> (run, Popen, start time, log file, step at launch)
    free = [s for s in slots]
    durations = []
    failures = []
    last_beat = time.time()

    def eta() -> str:
        """Remaining wall time: finished runs' mean duration for the runs still to start; for a running run, its
        own step rate since launch (a resumed run counts only the steps it trained here)."""
        if not todo and not running:
            return "ETA 0s"
        now = time.time()
        per_run = float(np.mean(durations)) if durations else None
        left_running, guesses = [], []
        for run, _, start, _, step0 in running.values():
            step, total_steps = _last_step(run.workdir), run.config["train"]["num_steps"]
            if step > step0:
                seconds_per_step = (now - start) / (step - step0)
                left_running.append(seconds_per_step * (total_steps - step))
                guesses.append(seconds_per_step * total_steps)
            else:
                left_running.append(None)
        per_run = per_run if per_run is not None else (float(np.mean(guesses)) if guesses else None)
        if per_run is None:
            return "ETA unknown"
        left = len(todo) * per_run + sum(per_run if x is None else x for x in left_running)
        return f"ETA {_duration(left / len(slots))}"

    def status_line() -> str:
        return f"[{done}/{total} done, {len(running)} running] elapsed {_duration(time.time() - started_at)}, {eta()}"

    interrupted = False
    try:
        while todo or running:
            while todo and free:
                run, slot = todo.pop(0), free.pop(0)
                os.makedirs(run.workdir, exist_ok=True)
                with open(os.path.join(run.workdir, "experiment.json"), "w") as f:
                    json.dump({"name": run.name, "command": run.command(), "config": run.config}, f, indent=1)
                resumed = os.path.isdir(os.path.join(run.workdir, "checkpoints"))
                logf = open(os.path.join(run.workdir, "train.log"), "a")
                logf.write(f"\n==== {datetime.datetime.now().isoformat(timespec='seconds')} {shlex.join(run.command())}\n")
                logf.flush()
                cores = slot.cores
                proc = subprocess.Popen(
                    run.command(), stdout=logf, stderr=subprocess.STDOUT, env={**os.environ, **cache_env, **slot.env},
                    preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if cores else None,
                )
                running[slot.index] = (run, proc, time.time(), logf, _last_step(run.workdir) if resumed else 0)
                entries[run.name].update(status="running", slot=slot.describe(), resumed=resumed)
                log(f"start {run.name}{' (resuming)' if resumed else ''} on {slot.describe()}; log {logf.name}")
            for index, (run, proc, start, logf, _) in list(running.items()):
                code = proc.poll()
                if code is None:
                    continue
                logf.close()
                del running[index]
                free.append(slots[index])
                wall = time.time() - start
                entry = entries[run.name]
                entry["wall_s"] = round(wall, 2)
                if code == 0 and run.finished:
                    done += 1
                    entry["status"] = "trained"
                    if not entry.get("resumed"):
                        durations.append(wall)
                    with open(run.summary_path) as f:
                        dice = json.load(f).get("mean_fg_dice", float("nan"))
                    log(f"done {run.name} in {_duration(wall)} (mean foreground Dice {dice:.4f}) {status_line()}")
                else:
                    why = f"exit status {code}" if code else "exited without summary.json (stopped before the end)"
                    entry["status"] = f"failed: {why}"
                    failures.append((run, why))
                    log(f"FAILED {run.name}: {why}; last lines of {run.workdir}/train.log:\n" + _tail(os.path.join(run.workdir, "train.log")))
            if running and time.time() - last_beat >= progress_every:
                last_beat = time.time()
                steps = ", ".join(f"{r.name} step {_last_step(r.workdir)}/{r.config['train']['num_steps']}" for r, *_ in running.values())
                log(f"{status_line()}: {steps}")
            if running:
                time.sleep(0.2)
    except (KeyboardInterrupt, _Stop):
        interrupted = True
        log("interrupted: asking the running trainings to save a checkpoint and stop")
        for run, proc, _, logf, _ in running.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for run, proc, _, logf, _ in running.values():
            try:
                proc.wait(timeout=300)
            except subprocess.TimeoutExpired:
                proc.kill()
            logf.close()
            entries[run.name]["status"] = "stopped (rerun to resume)"
    finally:
        signal.signal(signal.SIGTERM, previous)
        record["runs"] = list(entries.values())
        record["wall_s"] = round(time.time() - started_at, 2)
        record["devices"] = _probe_result(probe)
        _append_study(out, record)
    if interrupted:
        raise KeyboardInterrupt("study interrupted; rerun the same command to resume")
    if failures:
        raise StudyError(f"{len(failures)} run(s) failed (the others are kept; rerun to retry): "
                         + "; ".join(f"{r.name} ({why}, log {r.workdir}/train.log)" for r, why in failures))
    log(f"all {total} runs finished; wall time {_duration(record['wall_s'])}")
    return record


def _tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, errors="replace") as f:
            text = f.read().replace("\r", "\n")
    except OSError:
        return "    (no log)"
    return "\n".join("    " + line for line in [ln for ln in text.splitlines() if ln.strip()][-lines:])


def _probe_result(probe) -> dict | None:
    if probe is None:
        return None
    try:
        out, _ = probe.communicate(timeout=120)
        return json.loads(out.strip().splitlines()[-1])
    except (subprocess.TimeoutExpired, ValueError, IndexError):
        probe.kill()
        return None


def _append_study(out: str, record: dict) -> None:
    path = os.path.join(out, "study.json")
    study = {"invocations": []}
    if os.path.isfile(path):
        with open(path) as f:
            study = json.load(f)
    study["invocations"].append(record)
    os.makedirs(out, exist_ok=True)
    from combo_jax.training import write_text_atomic

    write_text_atomic(path, json.dumps(study, indent=1))


# --------------------------------------------------------------------------------------------------
# Reading the runs
# --------------------------------------------------------------------------------------------------


def _number(value: Any) -> float:
    """A metric as a float: None or missing -> nan ("n/a"), "inf"/"Infinity" strings -> inf."""
    if value is None or isinstance(value, bool):
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def read_run(run: Run) -> dict:
    """The run's summary.json, checked against the run it should hold, with per-organ values in ml.

    Returns {"run", "loss", "options", "value" (sweeps), "mean_fg_dice", "organs": {name: {metric: float,
    "share"}}}; every field comes from the file.
    """
    from combo_jax.training import flatten_config

    with open(run.summary_path) as f:
        summary = json.load(f)
    recorded = summary.get("config") or {}
    diff = config_differences(run.config, recorded)
    if diff:
        raise StudyError(f"{run.summary_path} records another configuration than its run: " + "; ".join(diff))
    if not isinstance(summary.get("loss") or recorded.get("loss"), dict):
        raise StudyError(f"{run.summary_path} records no loss")
    loss = dict(summary.get("loss") or recorded["loss"])
    name = loss.pop("name")
    voxel_ml = _number(summary.get("voxel_volume_ml", 0.001))
    data = recorded.get("data", {})
    total_voxels = None
    if "shape" in data and "num_val" in data:
        total_voxels = float(np.prod(data["shape"])) * data["num_val"]
    organs = {}
    for organ, row in summary["organs"].items():
        share = _number(row.get("share"))
        if math.isnan(share) and total_voxels:
            share = row["true_voxels"] / total_voxels
        organs[organ] = {
            "share": share,
            "dice": _number(row.get("dice")),
            "precision": _number(row.get("precision")),
            "recall": _number(row.get("recall")),
            "fp_voxels": _number(row.get("fp_voxels")),
            "fn_voxels": _number(row.get("fn_voxels")),
            "true_voxels": _number(row.get("true_voxels")),
            "fp_ml": _number(row.get("fp_voxels")) * voxel_ml,
            "fn_ml": _number(row.get("fn_voxels")) * voxel_ml,
            "hd95_mm": _number(row.get("hd95_mm")),
            "msd_mm": _number(row.get("msd_mm")),
            "nsd": _number(row.get("nsd")),
        }
    value = None
    if run.param is not None:
        value = flatten_config(recorded).get(run.param, math.nan)
        if isinstance(value, float) and math.isnan(value):
            raise StudyError(f"{run.summary_path} records no {run.param}")
    return {"run": run.name, "workdir": run.workdir, "seed": recorded.get("seed", run.seed), "loss": name, "options": loss, "value": value,
            "mean_fg_dice": _number(summary.get("mean_fg_dice")), "steps": summary.get("steps"),
            "elapsed_s": _number(summary.get("elapsed_s")), "organs": organs}


def group_metrics(record: dict, organs: Sequence[str]) -> dict:
    """One run's metrics over a group of organs: mean Dice/precision/recall/surface metrics, summed volumes."""
    rows = [record["organs"][o] for o in organs]
    out = {}
    for key in TABLE_METRICS + ("fp_voxels", "fn_voxels"):
        values = np.asarray([r[key] for r in rows], np.float64)
        if key in ("fp_ml", "fn_ml", "fp_voxels", "fn_voxels"):
            out[key] = float(values.sum())
        else:
            finite_or_inf = values[~np.isnan(values)]
            out[key] = float(finite_or_inf.mean()) if finite_or_inf.size else math.nan
    out["share"] = float(sum(r["share"] for r in rows))
    return out


def _stats(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample std (n - 1) over seeds, ignoring missing (nan) values; an inf makes the mean inf."""
    arr = np.asarray(values, np.float64)
    arr = arr[~np.isnan(arr)]
    if arr.size == 0:
        return math.nan, math.nan
    if np.isinf(arr).any():
        return float(arr.mean()), math.nan
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else math.nan


def aggregate(records: Sequence[dict], organs: Sequence[str], small: Sequence[str]) -> dict:
    """{scope: {metric: (mean, std)}} over the records (seeds) for every organ, "small" and "all"."""
    scopes = {o: [o] for o in organs}
    if small:
        scopes["small"] = list(small)
    scopes["all"] = list(organs)
    table = {}
    for scope, members in scopes.items():
        per_run = [group_metrics(r, members) for r in records]
        table[scope] = {k: _stats([p[k] for p in per_run]) for k in per_run[0]}
    table["mean_fg_dice"] = _stats([r["mean_fg_dice"] for r in records])
    return table


def _organ_order(records: Sequence[dict]) -> tuple[list[str], dict, list[str]]:
    organs = list(records[0]["organs"])
    for r in records:
        if list(r["organs"]) != organs:
            raise StudyError(f"run {r['run']} reports organs {list(r['organs'])}, run {records[0]['run']} reports {organs}")
    shares = {o: float(np.mean([r["organs"][o]["share"] for r in records])) for o in organs}
    return organs, shares, [o for o in organs if shares[o] < SMALL_SHARE]


# --------------------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------------------


def _fmt(value: float, digits: int = 3) -> str:
    if math.isnan(value):
        return "n/a"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.{digits}f}"


def _fmt_ml(value: float) -> str:
    if math.isnan(value) or math.isinf(value):
        return _fmt(value)
    return f"{value:.1f}" if abs(value) >= 10 else (f"{value:.2f}" if abs(value) >= 1 else f"{value:.3f}")


def _signed(value: float) -> str:
    if math.isnan(value) or math.isinf(value):
        return _fmt(value)
    return "0.000" if round(value, 3) == 0 else f"{value:+.3f}"


def _pm(stat: tuple[float, float], digits: int = 3) -> str:
    mean, std = stat
    return _fmt(mean, digits) + ("" if math.isnan(std) else f" ± {std:.{digits}f}")


def _options_text(options: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in options.items())


def _non_default(name: str, options: dict) -> dict:
    from combo_jax.training import loss_options

    defaults = loss_options(name)
    return {k: v for k, v in options.items() if k not in defaults or _json_tree(defaults[k]) != _json_tree(v)}


def _label(name: str, options: dict) -> str:
    changed = _non_default(name, options)
    return name + (f" ({_options_text(changed)})" if changed else "")


def _csv_value(value: Any) -> Any:
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return f"{value:.10g}"
    return value


def _write_csv(path: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for row in rows:
            writer.writerow([_csv_value(v) for v in row])


_STAT_KEYS = ("dice", "precision", "recall", "fp_ml", "fn_ml", "hd95_mm", "msd_mm", "nsd")
_RUN_HEADER = ["run", "loss", "options", "seed", "organ", "share", "dice", "precision", "recall", "fp_voxels",
               "fn_voxels", "fp_ml", "fn_ml", "hd95_mm", "msd_mm", "nsd", "mean_fg_dice", "steps", "elapsed_s"]


def _run_rows(records: Sequence[dict], *, param: str | None = None) -> list[list]:
    rows = []
    for r in records:
        for organ, m in r["organs"].items():
            row = [r["run"], r["loss"], json.dumps(r["options"]), r["seed"], organ, m["share"]]
            row += [m[k] for k in ("dice", "precision", "recall", "fp_voxels", "fn_voxels", "fp_ml", "fn_ml", "hd95_mm", "msd_mm", "nsd")]
            row += [r["mean_fg_dice"], r["steps"], r["elapsed_s"]]
            if param is not None:
                row.insert(4, json.dumps(r["value"]))
            rows.append(row)
    return rows


def _context_lines(runs: Sequence[Run], records: Sequence[dict], argv: Sequence[str], out: str) -> list[str]:
    first = records[0]
    sets = {k: v for k, v in runs[0].overrides.items() if k != "seed" and k != runs[0].param}
    seeds = sorted({r.seed for r in runs})
    steps = sorted({r["steps"] for r in records if r["steps"] is not None})
    data = runs[0].config.get("data", {})
    return [
        f"Command: `python -m combo_jax.experiments {shlex.join(argv)}`",
        "",
        f"Config `{os.path.relpath(runs[0].config_arg.partition(':')[0])}`"
        + (f" with {', '.join(f'{k}={v}' for k, v in sets.items())}" if sets else "")
        + f"; {len(seeds)} seed(s) ({', '.join(map(str, seeds))}) set `config.seed` (initial parameters, batch order); "
        f"`config.data.seed` = {data.get('seed', 'n/a')} for every run (same training and validation cases). "
        f"Steps per run: {', '.join(map(str, steps))}. Metrics on the validation split; Dice, precision and recall "
        f"from voxel counts summed over the validation cases; ± is the sample standard deviation over seeds.",
        "",
        f"Runs: `{os.path.relpath(os.path.dirname(first['workdir']), out)}/<name>/` (each with summary.json, report.md, "
        "metrics.jsonl, train.log).",
        "",
    ]


def _scopes(organs: Sequence[str], small: Sequence[str]) -> dict[str, list[str]]:
    """The rows of a table: each organ, then "small" (if any) and "all", with the organs each covers."""
    return {**{o: [o] for o in organs}, **({"small": list(small)} if small else {}), "all": list(organs)}


_FAILURE_HEADER = ["n_collapsed", "collapsed_seeds", "painted_seeds", "missed_seeds"]


def _failure_cells(records: Sequence[dict], members: Sequence[str]) -> list:
    """CSV cells: how many seeds failed on any of ``members``, which, and which painted or missed one."""
    count = study_stats.count_collapses([{**r, "organs": {o: r["organs"][o] for o in members}} for r in records])
    painted = sorted({s for seeds in count.painted.values() for s in seeds})
    missed = sorted({s for seeds in count.missed.values() for s in seeds})
    return [count.n_collapsed, ";".join(map(str, count.collapsed_seeds)), ";".join(map(str, painted)),
            ";".join(map(str, missed))]


def _collapse_lines(groups: dict, labels: dict) -> list[str]:
    """The "Collapses" section: per setting, how many seeds collapsed and how."""
    lines = ["## Collapses", "",
             f"A run collapses when an organ is *painted* (false-positive volume over {study_stats.FP_RATIO:g}x the "
             f"organ's true volume on the validation split) or *missed* (under {study_stats.MIN_RECALL:.0%} of its "
             "voxels found).", "", "| setting | collapsed seeds | which |", "|---|---|---|"]
    for key, recs in groups.items():
        count = study_stats.count_collapses(recs)
        which = count.describe().partition(" ")[2].strip("()") or "none"
        lines.append(f"| {labels[key]} | {count.n_collapsed}/{count.n_runs} | {which} |")
    return lines + [""]


# --------------------------------------------------------------------------------------------------
# compare
# --------------------------------------------------------------------------------------------------


def write_compare(runs: Sequence[Run], out: str, *, argv: Sequence[str] = ()) -> dict:
    """compare.md, compare.csv and compare_runs.csv from the runs' summary.json files; returns the table."""
    records = [read_run(r) for r in runs]
    organs, shares, small = _organ_order(records)
    groups: dict[tuple, list] = {}
    for rec in records:  # grouped by what the runs recorded: loss name and options
        groups.setdefault((rec["loss"], json.dumps(rec["options"], sort_keys=True)), []).append(rec)
    tables = {key: aggregate(recs, organs, small) for key, recs in groups.items()}

    header = ["loss", "options", "organ", "share", "n_seeds", "runs"]
    for k in _STAT_KEYS:
        header += [f"{k}_mean", f"{k}_std"]
    header += _FAILURE_HEADER
    rows = []
    for (name, options), recs in groups.items():
        for scope, members in _scopes(organs, small).items():
            share = shares[scope] if scope in shares else tables[(name, options)][scope]["share"][0]
            row = [name, options, scope, share, len(recs), ";".join(r["run"] for r in recs)]
            for k in _STAT_KEYS:
                row += list(tables[(name, options)][scope][k])
            rows.append(row + _failure_cells(recs, members))
    _write_csv(os.path.join(out, "compare.csv"), header, rows)
    _write_csv(os.path.join(out, "compare_runs.csv"), _RUN_HEADER, _run_rows(records))

    cols = "| loss | Dice | precision | recall | FP (ml) | FN (ml) | HD95 (mm) |"
    rule = "|---|---|---|---|---|---|---|"

    def metric_row(label, stats):
        return (f"| {label} | {_pm(stats['dice'])} | {_fmt(stats['precision'][0])} | {_fmt(stats['recall'][0])} | "
                f"{_fmt_ml(stats['fp_ml'][0])} | {_fmt_ml(stats['fn_ml'][0])} | {_fmt(stats['hd95_mm'][0], 1)} |")

    labels = {key: _label(key[0], json.loads(key[1])) for key in groups}
    lines = ["# Loss comparison", ""] + _context_lines(runs, records, argv, out)
    lines += ["## Overview", "", "| loss | mean foreground Dice | small-organ Dice | collapsed seeds | seeds | runs |",
              "|---|---|---|---|---|---|"]
    for key, recs in groups.items():
        t = tables[key]
        small_dice = _pm(t["small"]["dice"]) if small else "n/a"
        lines.append(f"| {labels[key]} | {_pm(t['mean_fg_dice'])} | {small_dice} | "
                     f"{study_stats.count_collapses(recs).n_collapsed}/{len(recs)} | {len(recs)} | "
                     f"{', '.join(r['run'] for r in recs)} |")
    lines.append("")
    lines += _collapse_lines(groups, labels)
    if small:
        lines += [f"## Small organs (under {SMALL_SHARE:.1%} of the voxels: "
                  + ", ".join(f"{o} {shares[o]:.3%}" for o in small) + ")", "",
                  "Dice, precision, recall and HD95: mean over the small organs; FP and FN: summed volume.", "", cols, rule]
        lines += [metric_row(labels[key], tables[key]["small"]) for key in groups]
        lines.append("")
    else:
        lines += [f"## Small organs", "", f"No organ is under {SMALL_SHARE:.1%} of the voxels.", ""]
    lines += ["## Per organ", ""]
    for organ in organs:
        lines += [f"### {organ} ({shares[organ]:.3%} of the voxels)", "", cols, rule]
        lines += [metric_row(labels[key], tables[key][organ]) for key in groups]
        lines.append("")
    lines += ["## Losses and their options", "",
              "As recorded in the runs' summary.json; an option differing from the loss's default "
              "(`combo_jax.training.loss_options(name)`) is marked *.", "", "| loss | options |", "|---|---|"]
    for key in groups:
        name, options = key[0], json.loads(key[1])
        changed = _non_default(name, options)
        lines.append(f"| {name} | " + ", ".join(f"{k}={v}{'*' if k in changed else ''}" for k, v in options.items()) + " |")
    lines += ["", "HD95 is the mean over validation cases of the 95th-percentile symmetric surface distance; \"inf\" "
              "when an organ was missed or hallucinated in every case, \"n/a\" when not recorded.", ""]
    with open(os.path.join(out, "compare.md"), "w") as f:
        f.write("\n".join(lines))
    return {"organs": organs, "small": small, "tables": tables, "groups": groups}


# --------------------------------------------------------------------------------------------------
# sweep
# --------------------------------------------------------------------------------------------------


def _trend(ys: Sequence[float]) -> str:
    """'increasing', 'decreasing', 'constant' or 'not monotone' (with Spearman's rank correlation) of ys, given
    in increasing order of the swept value."""
    from scipy import stats

    ys = np.asarray(ys, np.float64)
    if len(ys) < 2 or not np.all(np.isfinite(ys)):
        return "n/a"
    d = np.diff(ys)
    if not d.any():
        return "constant"
    rho = float(np.corrcoef(np.arange(len(ys)), stats.rankdata(ys))[0, 1])
    if np.all(d >= 0):
        return f"increasing (ρ = {rho:+.2f})"
    if np.all(d <= 0):
        return f"decreasing (ρ = {rho:+.2f})"
    return f"not monotone (ρ = {rho:+.2f})"


def _sortable(values: Sequence[Any]) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def choose_value(target: Target, values: Sequence[Any], tables: dict, organs: Sequence[str], small: Sequence[str]) -> dict:
    """The swept value that best meets ``target`` (see the module docstring) and how each value fares.

    ``tables[value]`` is ``aggregate(...)`` of that value's runs.
    """
    if target.scope == "all":
        scope = list(organs)
    elif target.scope == "small":
        if not small:
            raise StudyError(f"--target {target.text!r}: no organ is under {SMALL_SHARE:.1%} of the voxels")
        scope = list(small)
    elif target.scope in organs:
        scope = [target.scope]
    else:
        raise StudyError(f"--target {target.text!r}: unknown organ {target.scope!r}; the runs report {', '.join(organs)}")
    rows = []
    for value in values:
        got = {o: tables[value][o][target.metric][0] for o in scope}
        shortfall = max(target.shortfall(v) for v in got.values())
        rows.append({"value": value, "got": got, "met": shortfall == 0.0, "shortfall": shortfall,
                     "dice": tables[value]["mean_fg_dice"][0]})
    meeting = [r for r in rows if r["met"]]
    if meeting:
        best = max(meeting, key=lambda r: r["dice"])
    else:
        best = min(rows, key=lambda r: (r["shortfall"], -r["dice"]))
    return {"target": target, "scope": scope, "rows": rows, "best": best, "met": bool(meeting)}


def write_sweep(runs: Sequence[Run], out: str, *, param: str, values: Sequence[Any], default: Any,
                targets: Sequence[Target] = (), argv: Sequence[str] = ()) -> dict:
    """sweep_<param>.md/.csv/_runs.csv/.png from the runs' summary.json files; returns the tables and choices."""
    records = [read_run(r) for r in runs]
    organs, shares, small = _organ_order(records)
    by_value = {}
    for run, rec in zip(runs, records):
        if _json_tree(rec["value"]) != _json_tree(run.value):
            raise StudyError(f"{run.summary_path} records {param}={rec['value']!r}, but run {run.name} is for {run.value!r}")
        by_value.setdefault(json.dumps(_json_tree(rec["value"])), []).append(rec)
    ordered = sorted(values) if _sortable(values) else list(values)
    keyed = {v: by_value[json.dumps(_json_tree(v))] for v in ordered}
    tables = {v: aggregate(recs, organs, small) for v, recs in keyed.items()}
    loss_names = sorted({r["loss"] for r in records})
    stem = os.path.join(out, f"sweep_{_safe(param)}")

    header = ["loss", "options", "param", "value", "organ", "share", "n_seeds", "runs"]
    for k in _STAT_KEYS:
        header += [f"{k}_mean", f"{k}_std"]
    header += _FAILURE_HEADER
    rows = []
    for v in ordered:
        recs = keyed[v]
        options = {json.dumps(r["options"], sort_keys=True) for r in recs}
        if len(options) != 1 or len({r["loss"] for r in recs}) != 1:
            raise StudyError(f"the runs of {param}={v!r} record different losses or options: {', '.join(r['run'] for r in recs)}")
        for scope, members in _scopes(organs, small).items():
            share = shares.get(scope, tables[v][scope]["share"][0])
            row = [recs[0]["loss"], json.dumps(recs[0]["options"]), param, json.dumps(recs[0]["value"]), scope, share,
                   len(recs), ";".join(r["run"] for r in recs)]
            for k in _STAT_KEYS:
                row += list(tables[v][scope][k])
            rows.append(row + _failure_cells(recs, members))
    _write_csv(stem + ".csv", header, rows)
    _write_csv(stem + "_runs.csv", _RUN_HEADER[:4] + ["value"] + _RUN_HEADER[4:], _run_rows(records, param=param))
    plot_sweep(stem + ".png", param=param, values=ordered, tables=tables, organs=organs, shares=shares)

    v_default = default if default in ordered else None
    lines = [f"# Sweep of {param} ({', '.join(loss_names)} loss)", ""] + _context_lines(runs, records, argv, out)
    lines += [f"The config's own value: {param} = {default!r}" + ("" if v_default is not None else " (not in the sweep)") + ".",
              "", f"Plot: `{os.path.basename(stem)}.png` (false-positive and false-negative volume per organ against {param}).", ""]
    lines += ["## All organs", "",
              f"FP and FN: volume summed over the organs; Dice, precision, recall: mean over the organs.", "",
              f"| {param} | loss | mean foreground Dice | FP (ml) | FN (ml) | precision | recall | collapsed seeds | runs |",
              "|---|---|---|---|---|---|---|---|---|"]
    for v in ordered:
        t, recs = tables[v], keyed[v]
        lines.append(f"| {format_value(recs[0]['value'])} | {_label(recs[0]['loss'], recs[0]['options'])} | {_pm(t['mean_fg_dice'])} | "
                     f"{_fmt_ml(t['all']['fp_ml'][0])} | {_fmt_ml(t['all']['fn_ml'][0])} | {_fmt(t['all']['precision'][0])} | "
                     f"{_fmt(t['all']['recall'][0])} | {study_stats.count_collapses(recs).n_collapsed}/{len(recs)} | "
                     f"{', '.join(r['run'] for r in recs)} |")
    lines += ["", f"Trend over increasing {param} (means over seeds; ρ: Spearman rank correlation):", "",
              "| organ | share | FP volume | FN volume | precision | recall |", "|---|---|---|---|---|---|"]
    trend_scopes = [*organs, *(["small"] if small else []), "all"]
    for scope in trend_scopes:
        share = shares.get(scope, tables[ordered[0]][scope]["share"][0])
        cells = [_trend([tables[v][scope][k][0] for v in ordered]) if _sortable(ordered) else "n/a"
                 for k in ("fp_ml", "fn_ml", "precision", "recall")]
        lines.append(f"| {scope} | {share:.3%} | " + " | ".join(cells) + " |")
    lines.append("")
    lines += _collapse_lines({v: keyed[v] for v in ordered}, {v: f"{param} = {format_value(v)}" for v in ordered})
    if _sortable(ordered) and len(ordered) > 1:
        lines += _paired_sweep(stem, param=param, ordered=ordered, keyed=keyed, scopes=_scopes(organs, small))
    lines += ["## Per organ", ""]
    for organ in [*organs, *(["small"] if small else [])]:
        title = f"{organ} ({shares[organ]:.3%} of the voxels)" if organ in shares else \
            f"small organs ({', '.join(small)}; FP/FN summed, the rest averaged)"
        lines += [f"### {title}", "", f"| {param} | Dice | precision | recall | FP (ml) | FN (ml) | HD95 (mm) |",
                  "|---|---|---|---|---|---|---|"]
        for v in ordered:
            s = tables[v][organ]
            lines.append(f"| {format_value(keyed[v][0]['value'])} | {_pm(s['dice'])} | {_fmt(s['precision'][0])} | "
                         f"{_fmt(s['recall'][0])} | {_pm(s['fp_ml'], 3)} | {_pm(s['fn_ml'], 3)} | {_fmt(s['hd95_mm'][0], 1)} |")
        lines.append("")

    choices = []
    for target in targets:
        choice = choose_value(target, ordered, tables, organs, small)
        choices.append(choice)
        lines += _target_lines(choice, param=param, ordered=ordered, tables=tables, organs=organs, default=v_default)
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines))
    return {"organs": organs, "small": small, "tables": tables, "values": ordered, "choices": choices,
            "paths": {ext: stem + ext for ext in (".md", ".csv", ".png")}}


def _paired_sweep(stem: str, *, param: str, ordered: Sequence[Any], keyed: dict, scopes: dict) -> list[str]:
    """Seed-by-seed comparisons of the swept values: every pair (low, high) in ``<stem>_paired.csv``, and the
    lowest against the highest value, and each value against the next, in the report."""

    def scoped(recs, scope):  # one pseudo-organ per scope: group metrics (FP/FN summed over the group)
        return [{"seed": r["seed"], "organs": {scope: group_metrics(r, scopes[scope])}} for r in recs]

    header = ["param", "low", "high", "organ", "metric", "n_seeds", "n_higher", "n_lower", "n_tied", "p_higher",
              "p_lower", "mean_change", "ci_low", "ci_high", "changes"]
    rows, directions = [], {}
    for i, low in enumerate(ordered):
        for high in ordered[i + 1:]:
            for scope in scopes:
                d = study_stats.direction(scoped(keyed[low], scope), scoped(keyed[high], scope), scope)
                directions[(low, high, scope)] = d
                for metric, p in (("fp_ml", d.fp), ("fn_ml", d.fn)):
                    rows.append([param, json.dumps(low), json.dumps(high), scope, metric, p.n, p.n_greater, p.n_less,
                                 p.n_tied, p.p_greater, p.p_less, p.mean_diff, *p.interval,
                                 ";".join(f"{s}:{x:.6g}" for s, x in zip(p.seeds, p.diffs))])
    _write_csv(stem + "_paired.csv", header, rows)

    lo, hi = ordered[0], ordered[-1]
    lines = [f"## Seed by seed: {param} = {format_value(lo)} against {format_value(hi)}", "",
             f"Each seed's run at {param} = {format_value(hi)} against the same seed's run at {format_value(lo)} (same "
             "initial parameters and batches). \"FP rises\": seeds where the false-positive volume is larger at the "
             "higher value; \"FN falls\": seeds where the false-negative volume is smaller; \"both\": seeds with both. "
             "p: one-sided exact sign test (ties dropped) against \"no effect\"; CI: 95% percentile bootstrap interval "
             "of the mean change over seeds. Every pair of values: "
             f"`{os.path.basename(stem)}_paired.csv`.", "", study_stats.DIRECTION_HEADER, "|---|---|---|---|---|---|---|---|"]
    for scope in scopes:
        lines.append(f"| {scope} | " + " | ".join(directions[(lo, hi, scope)].cells()) + " |")
    if len(ordered) > 2:
        steps = list(zip(ordered[:-1], ordered[1:]))
        lines += ["", f"Each value against the next: seeds where FP rises / seeds where FN falls.", "",
                  "| organ | " + " | ".join(f"{format_value(a)} → {format_value(b)}" for a, b in steps) + " |",
                  "|---|" + "---|" * len(steps)]
        for scope in scopes:
            cells = [f"{directions[(a, b, scope)].fp.n_greater} / {directions[(a, b, scope)].fn.n_less} of "
                     f"{directions[(a, b, scope)].fp.n}" for a, b in steps]
            lines.append(f"| {scope} | " + " | ".join(cells) + " |")
    return lines + [""]


def _target_lines(choice: dict, *, param: str, ordered, tables, organs, default) -> list[str]:
    target, best = choice["target"], choice["best"]
    lines = [f"## Target `{target.text}`", "",
             f"Met when the mean over seeds of `{target.metric}` is {target.op} {target.threshold:g} for "
             f"{'every organ in ' if len(choice['scope']) > 1 else ''}{', '.join(choice['scope'])}. "
             "Among the values that meet it, the best mean foreground Dice wins; if none meets it, the smallest worst "
             "shortfall.", "",
             f"| {param} | {target.metric} ({', '.join(choice['scope'])}) | meets | shortfall | mean foreground Dice |",
             "|---|---|---|---|---|"]
    for r in choice["rows"]:
        got = ", ".join(_fmt(x, 3) for x in r["got"].values())
        lines.append(f"| {format_value(r['value'])} | {got} | {'yes' if r['met'] else 'no'} | {_fmt(r['shortfall'], 3)} | "
                     f"{_fmt(r['dice'])} |")
    verdict = "meets the target" if choice["met"] else "no value meets the target; this one comes closest"
    lines += ["", f"**Choice: {param} = {format_value(best['value'])}** ({verdict}; mean foreground Dice {_fmt(best['dice'])}).", ""]
    if default is None:
        lines += [f"The config's own value of {param} is not in the sweep, so the trade-off below is not shown.", ""]
        return lines
    if best["value"] == default:
        lines += [f"That is the config's own value; nothing changes elsewhere.", ""]
        return lines
    lines += [f"Trade-off against the config's value {param} = {format_value(default)} (change = chosen - default; "
              "organs in the target's scope marked *):", "",
              "| organ | Dice | precision | recall | FP (ml) | FN (ml) |", "|---|---|---|---|---|---|"]
    for organ in [*organs, "all"]:
        a, b = tables[best["value"]][organ], tables[default][organ]
        mark = "*" if organ in choice["scope"] else ""
        cells = []
        for k, fmt in (("dice", _fmt), ("precision", _fmt), ("recall", _fmt), ("fp_ml", _fmt_ml), ("fn_ml", _fmt_ml)):
            cells.append(f"{fmt(b[k][0])} → {fmt(a[k][0])} ({_signed(a[k][0] - b[k][0])})")
        lines.append(f"| {organ}{mark} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def plot_sweep(path: str, *, param: str, values: Sequence[Any], tables: dict, organs: Sequence[str], shares: dict) -> None:
    """One panel per organ (and all organs): FP and FN volume (mean ± std over seeds) against the swept value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [*organs, "all"]
    ncols = min(4, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 3.0 * nrows), squeeze=False)
    numeric = _sortable(values)
    xs = np.asarray(values, np.float64) if numeric else np.arange(len(values), dtype=np.float64)
    for ax, scope in zip(axes.flat, panels):
        everything = []
        for key, color, marker, label in (("fp_ml", "tab:red", "o", "false positives"), ("fn_ml", "tab:blue", "s", "false negatives")):
            mean = np.asarray([tables[v][scope][key][0] for v in values])
            std = np.nan_to_num(np.asarray([tables[v][scope][key][1] for v in values]))
            ax.errorbar(xs, mean, yerr=std, color=color, marker=marker, capsize=3, label=label)
            everything.extend(mean[np.isfinite(mean)].tolist())
        positive = [y for y in everything if y > 0]
        if positive and len(positive) == len(everything) and max(positive) / min(positive) > 20:
            ax.set_yscale("log")
        title = f"{scope} ({shares[scope]:.2%})" if scope in shares else "all organs (sum)"
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(param)
        ax.set_ylabel("volume (ml)")
        ax.set_xticks(xs, [format_value(v) for v in values])
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"False positives and false negatives against {param} (validation, mean ± std over seeds)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def loss_defaults_table() -> str:
    """Markdown table of every loss's default options, from ``combo_jax.training.loss_options``."""
    from combo_jax.training import loss_options

    lines = ["| loss | default options |", "|---|---|"]
    lines += [f"| {name} | {_options_text(loss_options(name))} |" for name in ALL_LOSSES]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m combo_jax.experiments", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("--config", required=True, help="a configs/*.py file as train.py takes it (file.py or file.py:loss)")
        p.add_argument("--seeds", type=int, default=1, help="number of seeds per setting (seeds first-seed .. first-seed+N-1)")
        p.add_argument("--first-seed", type=int, default=0)
        p.add_argument("--out", required=True, help="results folder; runs go to OUT/runs/<name>/")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="config override for every run (e.g. train.num_steps=400); repeatable")
        p.add_argument("--devices", default="auto", help="'auto', 'cpu', or comma-separated GPU ids")
        p.add_argument("--parallel", type=int, default=None, help="trainings at once (default: GPU count, 1 on a CPU)")
        p.add_argument("--compile-cache", default=None, metavar="DIR",
                       help="JAX compilation cache shared by the runs (default OUT/jax_cache; 'none' to disable)")
        p.add_argument("--progress-every", type=float, default=60.0, help="seconds between progress lines")
        p.add_argument("--dry-run", action="store_true", help="print the runs and their commands; train nothing")

    sub.add_parser("losses", help="print each loss's default options (a markdown table) and exit")
    p = sub.add_parser("compare", help="train each loss with N seeds; per-organ tables")
    common(p)
    p.add_argument("--losses", default=None, help=f"comma-separated (default: all: {','.join(ALL_LOSSES)})")
    p = sub.add_parser("sweep", help="train each value of one config key with N seeds; FP/FN tables and plot")
    common(p)
    p.add_argument("--param", required=True, help="dotted config key, e.g. loss.beta or loss.alpha")
    p.add_argument("--values", required=True, help="comma-separated values (use ';' to separate tuple values)")
    p.add_argument("--target", action="append", default=[], metavar="METRIC OP X:SCOPE",
                   help="e.g. 'recall>=0.95:pancreas' or 'fp_ml<=0.5:all'; repeatable")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    if args.command == "losses":
        print(loss_defaults_table())
        return 0
    if args.seeds < 1:
        raise StudyError(f"--seeds must be at least 1, got {args.seeds}")
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    sets = dict(parse_assignment(s) for s in args.set)
    if not os.path.isfile(_TRAIN_PY):
        raise StudyError(f"train.py not found at {_TRAIN_PY}: run the study from a source checkout of combo_jax")
    if args.command == "compare":
        suffix = args.config.partition(":")[2]
        losses = args.losses.split(",") if args.losses else ([suffix] if suffix else list(ALL_LOSSES))
        runs = plan_compare(config=args.config, losses=[x.strip() for x in losses], seeds=seeds, out=args.out, sets=sets)
        targets = []
    else:
        separator = ";" if ";" in args.values else ","
        values = [v.strip() for v in args.values.split(separator) if v.strip()]
        runs, base, default, parsed = plan_sweep(config=args.config, param=args.param, values=values, seeds=seeds,
                                                 out=args.out, sets=sets)
        targets = [parse_target(t, organs=organ_names(base)) for t in args.target]
    check_workdirs(runs)
    if args.dry_run:
        for run in runs:
            print(f"{run.name}: {'finished' if run.finished else 'to train'}: {shlex.join(run.command())}")
        return 0
    os.makedirs(args.out, exist_ok=True)
    slots = make_slots(devices=args.devices, parallel=args.parallel)
    try:
        cache = os.path.join(args.out, "jax_cache") if args.compile_cache is None else (
            None if args.compile_cache.lower() == "none" else args.compile_cache)
        run_study(runs, slots=slots, out=args.out, argv=argv, progress_every=args.progress_every, compile_cache=cache)
    except KeyboardInterrupt as err:
        print(err, file=sys.stderr)
        return 130
    if args.command == "compare":
        write_compare(runs, args.out, argv=argv)
        print(f"wrote {os.path.join(args.out, 'compare.md')} and compare.csv")
    else:
        result = write_sweep(runs, args.out, param=args.param, values=parsed, default=default, targets=targets, argv=argv)
        print(f"wrote {result['paths']['.md']}, .csv and .png")
        for choice in result["choices"]:
            best = choice["best"]
            print(f"target {choice['target'].text}: {args.param}={format_value(best['value'])} "
                  f"({'meets it' if choice['met'] else 'no value meets it; the closest'}; mean foreground Dice {_fmt(best['dice'])})")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except StudyError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
