"""The study's tables and plots: ``compare.md``/``.csv``, ``sweep_<param>.md``/``.csv``/``_runs.csv``/``.png``."""

from __future__ import annotations

import csv
import json
import math
import os
import shlex
from collections.abc import Sequence
from typing import Any

import numpy as np

from combo_jax import config as config_lib
from combo_jax.experiments.plan import Run, StudyError, format_value, _safe
from combo_jax.experiments import stats
from combo_jax.experiments.results import (SMALL_SHARE, Target, aggregate, choose_value, group_metrics, organ_order,
                                           read_run, sortable)

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
    """The options that differ from those the shipped configs train loss ``name`` with (configs/default.py)."""
    from combo_jax.configs import default

    defaults = default.loss_config(name).to_dict()
    return {k: v for k, v in options.items()
            if k not in defaults or config_lib.as_json_tree(defaults[k]) != config_lib.as_json_tree(v)}


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
    count = stats.count_collapses([{**r, "organs": {o: r["organs"][o] for o in members}} for r in records])
    painted = sorted({s for seeds in count.painted.values() for s in seeds})
    missed = sorted({s for seeds in count.missed.values() for s in seeds})
    return [count.n_collapsed, ";".join(map(str, count.collapsed_seeds)), ";".join(map(str, painted)),
            ";".join(map(str, missed))]


def _collapse_lines(groups: dict, labels: dict) -> list[str]:
    """The "Collapses" section: per setting, how many seeds collapsed and how."""
    lines = ["## Collapses", "",
             f"A run collapses when an organ is *painted* (false-positive volume over {stats.FP_RATIO:g}x the "
             f"organ's true volume on the validation split) or *missed* (under {stats.MIN_RECALL:.0%} of its "
             "voxels found).", "", "| setting | collapsed seeds | which |", "|---|---|---|"]
    for key, recs in groups.items():
        count = stats.count_collapses(recs)
        which = count.describe().partition(" ")[2].strip("()") or "none"
        lines.append(f"| {labels[key]} | {count.n_collapsed}/{count.n_runs} | {which} |")
    return lines + [""]


def write_compare(runs: Sequence[Run], out: str, *, argv: Sequence[str] = ()) -> dict:
    """compare.md, compare.csv and compare_runs.csv from the runs' summary.json files; returns the table."""
    records = [read_run(r) for r in runs]
    organs, shares, small = organ_order(records)
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
                     f"{stats.count_collapses(recs).n_collapsed}/{len(recs)} | {len(recs)} | "
                     f"{', '.join(r['run'] for r in recs)} |")
    lines.append("")
    lines += _collapse_lines(groups, labels)
    lines += _paired_compare(os.path.join(out, "compare_paired.csv"), groups, labels,
                             scopes={"all": list(organs), **({"small": list(small)} if small else {})})
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
              "As recorded in the runs' summary.json; an option differing from the shipped configs' "
              "(`configs/default.py`) is marked *.", "", "| loss | options |", "|---|---|"]
    for key in groups:
        name, options = key[0], json.loads(key[1])
        changed = _non_default(name, options)
        lines.append(f"| {name} | " + ", ".join(f"{k}={v}{'*' if k in changed else ''}" for k, v in options.items()) + " |")
    lines += ["", "HD95 is the mean over validation cases of the 95th-percentile symmetric surface distance; \"inf\" "
              "when an organ was missed or hallucinated in every case, \"n/a\" when not recorded.", ""]
    with open(os.path.join(out, "compare.md"), "w") as f:
        f.write("\n".join(lines))
    return {"organs": organs, "small": small, "tables": tables, "groups": groups}


def _paired_compare(path: str, groups: dict, labels: dict, *, scopes: dict) -> list[str]:
    """Seed by seed, the first loss of the comparison against each other one: in how many seeds its Dice (mean
    over all organs, and over the small ones) is higher, with a sign test and a bootstrap interval of the mean
    difference; every pair in ``path`` (compare_paired.csv). Nothing when there is one loss only (and a
    ``path`` left by an earlier comparison in the same folder is removed, as the other tables are rewritten)."""
    keys = list(groups)
    if len(keys) < 2:
        if os.path.exists(path):
            os.remove(path)
        return []
    first = keys[0]
    header = ["loss", "options", "against_loss", "against_options", "scope", "metric", "n_seeds", "n_higher",
              "n_lower", "n_tied", "p_higher", "p_lower", "mean_change", "ci_low", "ci_high", "changes"]
    def dice(recs, members):  # {seed: Dice over the members}
        return {int(r["seed"]): group_metrics(r, members)["dice"] for r in recs}

    rows, cells = [], {}
    for key in keys[1:]:
        if not {r["seed"] for r in groups[key]} & {r["seed"] for r in groups[first]}:
            continue  # no seed in common: nothing to pair
        for scope, members in scopes.items():
            # the first loss minus this one, per seed
            p = stats.paired(dice(groups[key], members), dice(groups[first], members))
            rows.append([*first, *key, scope, "dice", p.n, p.n_greater, p.n_less, p.n_tied, p.p_greater, p.p_less,
                         p.mean_diff, *p.interval, ";".join(f"{s}:{x:.6g}" for s, x in zip(p.seeds, p.diffs))])
            cells[(key, scope)] = (f"{p.n_greater}/{p.n}", stats.format_p(p.p_greater), stats.format_p(p.p_less),
                                   f"{p.mean_diff:+.3f}" if math.isfinite(p.mean_diff) else "n/a",
                                   "n/a" if math.isnan(p.interval[0]) else f"[{p.interval[0]:+.3f}, {p.interval[1]:+.3f}]")
    _write_csv(path, header, rows)
    names = {"all": "mean Dice over the organs", "small": "small-organ Dice"}
    lines = [f"## Seed by seed: {labels[first]} against each other loss", "",
             f"For each seed, {labels[first]}'s Dice minus the other loss's (same seed: same initial draws and batch "
             "order). \"Higher\": seeds where it is higher; p: one-sided exact sign test (ties dropped) for higher, "
             "then for lower; CI: 95% percentile bootstrap interval of the mean difference. "
             f"`{os.path.basename(path)}` has every value.", "",
             "| against | " + " | ".join(f"{names[s]}: higher (seeds) | p higher | p lower | mean difference, 95% CI"
                                         for s in scopes) + " |",
             "|---|" + "---|---|---|---|" * len(scopes)]
    for key in (k for k in keys[1:] if (k, "all") in cells):
        parts = []
        for scope in scopes:
            n, p_hi, p_lo, mean, ci = cells[(key, scope)]
            parts += [n, p_hi, p_lo, f"{mean} {ci}"]
        lines.append(f"| {labels[key]} | " + " | ".join(parts) + " |")
    return lines + [""]


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
    rho = float(stats.spearmanr(np.arange(len(ys)), ys).statistic)
    if np.all(d >= 0):
        return f"increasing (ρ = {rho:+.2f})"
    if np.all(d <= 0):
        return f"decreasing (ρ = {rho:+.2f})"
    return f"not monotone (ρ = {rho:+.2f})"


def write_sweep(runs: Sequence[Run], out: str, *, param: str, values: Sequence[Any], default: Any,
                targets: Sequence[Target] = (), argv: Sequence[str] = ()) -> dict:
    """sweep_<param>.md/.csv/_runs.csv/.png from the runs' summary.json files; returns the tables and choices."""
    records = [read_run(r) for r in runs]
    organs, shares, small = organ_order(records)
    by_value = {}
    for run, rec in zip(runs, records):
        if config_lib.as_json_tree(rec["value"]) != config_lib.as_json_tree(run.value):
            raise StudyError(f"{run.summary_path} records {param}={rec['value']!r}, but run {run.name} is for {run.value!r}")
        by_value.setdefault(json.dumps(config_lib.as_json_tree(rec["value"])), []).append(rec)
    ordered = sorted(values) if sortable(values) else list(values)
    keyed = {v: by_value[json.dumps(config_lib.as_json_tree(v))] for v in ordered}
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
                     f"{_fmt(t['all']['recall'][0])} | {stats.count_collapses(recs).n_collapsed}/{len(recs)} | "
                     f"{', '.join(r['run'] for r in recs)} |")
    lines += ["", f"Trend over increasing {param} (means over seeds; ρ: Spearman rank correlation):", "",
              "| organ | share | FP volume | FN volume | precision | recall |", "|---|---|---|---|---|---|"]
    trend_scopes = [*organs, *(["small"] if small else []), "all"]
    for scope in trend_scopes:
        share = shares.get(scope, tables[ordered[0]][scope]["share"][0])
        cells = [_trend([tables[v][scope][k][0] for v in ordered]) if sortable(ordered) else "n/a"
                 for k in ("fp_ml", "fn_ml", "precision", "recall")]
        lines.append(f"| {scope} | {share:.3%} | " + " | ".join(cells) + " |")
    lines.append("")
    lines += _collapse_lines({v: keyed[v] for v in ordered}, {v: f"{param} = {format_value(v)}" for v in ordered})
    if sortable(ordered) and len(ordered) > 1:
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
                d = stats.direction(scoped(keyed[low], scope), scoped(keyed[high], scope), scope)
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
             f"`{os.path.basename(stem)}_paired.csv`.", "", stats.DIRECTION_HEADER, "|---|---|---|---|---|---|---|---|"]
    for scope in scopes:
        lines.append(f"| {scope} | " + " | ".join(directions[(lo, hi, scope)].cells()) + " |")
    if len(ordered) > 2:
        steps = list(zip(ordered[:-1], ordered[1:]))
        lines += ["", "Each value against the next: seeds where FP rises / seeds where FN falls.", "",
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
    numeric = sortable(values)
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
