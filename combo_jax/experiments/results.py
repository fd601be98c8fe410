"""Reading a study's runs and summarizing them over seeds: per-organ statistics, and targets for a swept value.

Every number comes from the runs' own ``summary.json``; the table rows carry the loss name and options the runs
recorded, never what the command line asked for.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from combo_jax import config as config_lib
from combo_jax.experiments.plan import Run, StudyError

SMALL_SHARE = 0.005  # organs under 0.5% of the validation voxels form the "small organs" block
TARGET_METRICS = ("dice", "precision", "recall", "fp_ml", "fn_ml", "fp_voxels", "fn_voxels", "hd95_mm", "msd_mm", "nsd")
TABLE_METRICS = ("dice", "precision", "recall", "fp_ml", "fn_ml", "hd95_mm", "msd_mm", "nsd")
_OPS = {">=": lambda a, b: a >= b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b, "<": lambda a, b: a < b}

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
    with open(run.summary_path) as f:
        summary = json.load(f)
    recorded = summary.get("config") or {}
    diff = config_lib.differences(run.config, recorded)
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
        value = config_lib.flatten(recorded).get(run.param, math.nan)
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


def stats(values: Sequence[float]) -> tuple[float, float]:
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
        table[scope] = {k: stats([p[k] for p in per_run]) for k in per_run[0]}
    table["mean_fg_dice"] = stats([r["mean_fg_dice"] for r in records])
    return table


def organ_order(records: Sequence[dict]) -> tuple[list[str], dict, list[str]]:
    organs = list(records[0]["organs"])
    for r in records:
        if list(r["organs"]) != organs:
            raise StudyError(f"run {r['run']} reports organs {list(r['organs'])}, run {records[0]['run']} reports {organs}")
    shares = {o: float(np.mean([r["organs"][o]["share"] for r in records])) for o in organs}
    return organs, shares, [o for o in organs if shares[o] < SMALL_SHARE]


def sortable(values: Sequence[Any]) -> bool:
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
