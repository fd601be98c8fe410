"""The tables of docs/results.md, from the CSVs the experiment runner wrote: docs/results_tables.md.

    python scripts/results_tables.py [--results results] [--out docs/results_tables.md]

Reads RESULTS/phantom and RESULTS/totalseg_ct (compare.csv, compare_paired.csv, sweep_loss.beta.csv,
sweep_loss.beta_paired.csv, sweep_loss.alpha.csv; a missing file leaves its table out) and writes one markdown
file: per setting the mean and standard deviation over seeds, how many seeds collapsed and how, and the
seed-by-seed comparisons (the first loss against the others, beta's lowest value against its highest).
`make study` runs it after the trainings.
"""

import argparse
import csv
import os


def _read(path):
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return list(csv.DictReader(f))


def _num(text, digits=3):
    if text in ("", None):
        return "n/a"
    value = float(text)
    return "inf" if value == float("inf") else f"{value:.{digits}f}"


def _pm(row, key):
    std = row[f"{key}_std"]
    return _num(row[f"{key}_mean"]) + ("" if std in ("", None) else f" ± {float(std):.3f}")


def _ml(text):
    if text in ("", None):
        return "n/a"
    v = float(text)
    return f"{v:.1f}" if abs(v) >= 10 else (f"{v:.2f}" if abs(v) >= 1 else f"{v:.3f}")


def _failures(rows, setting_key, setting):
    """'k/n (seed s: organ painted, ...)' for one setting, from the per-organ rows' seed lists."""
    organs = [r for r in rows if r[setting_key] == setting and r["organ"] not in ("small", "all")]
    every = next(r for r in rows if r[setting_key] == setting and r["organ"] == "all")
    by_seed = {}
    for r in organs:
        for kind in ("painted", "missed"):
            for seed in filter(None, r[f"{kind}_seeds"].split(";")):
                by_seed.setdefault(int(seed), []).append(f"{r['organ']} {kind}")
    detail = "; ".join(f"seed {s}: {', '.join(w)}" for s, w in sorted(by_seed.items()))
    return f"{every['n_collapsed']}/{every['n_seeds']}" + (f" ({detail})" if detail else "")


def _small(rows):
    """The organs under 0.5% of the voxels, in table order."""
    organs = [o for o in dict.fromkeys(r["organ"] for r in rows) if o not in ("small", "all")]
    return [o for o in organs if float(next(r for r in rows if r["organ"] == o)["share"]) < 0.005]


def compare_table(rows):
    small = _small(rows)
    head = "| loss | mean Dice over organs | " + " | ".join(f"{o} Dice" for o in small) + \
           " | small-organ FP (ml) | small-organ FN (ml) | collapsed seeds |"
    lines = [head, "|---|---|" + "---|" * len(small) + "---|---|---|"]
    for loss in dict.fromkeys(r["loss"] + "\t" + r["options"] for r in rows):
        name, options = loss.split("\t")
        mine = [r for r in rows if r["loss"] == name and r["options"] == options]
        get = {r["organ"]: r for r in mine}
        group = get.get("small", get["all"])
        lines.append(f"| {name} | {_pm(get['all'], 'dice')} | " + " | ".join(_pm(get[o], "dice") for o in small) +
                     f" | {_ml(group['fp_ml_mean'])} | {_ml(group['fn_ml_mean'])} | "
                     f"{_failures([{**r, 'setting': loss} for r in mine], 'setting', loss)} |")
    return lines


def sweep_table(rows, param):
    small = _small(rows)
    lines = [f"| {param} | mean Dice over organs | " + " | ".join(f"{o} Dice" for o in small) +
             " | FP all organs (ml) | FN all organs (ml) | collapsed seeds |",
             "|---|---|" + "---|" * len(small) + "---|---|---|"]
    for value in dict.fromkeys(r["value"] for r in rows):
        get = {r["organ"]: r for r in rows if r["value"] == value}
        lines.append(f"| {value} | {_pm(get['all'], 'dice')} | " + " | ".join(_pm(get[o], "dice") for o in small) +
                     f" | {_ml(get['all']['fp_ml_mean'])} | {_ml(get['all']['fn_ml_mean'])} | "
                     f"{_failures(rows, 'value', value)} |")
    return lines


def paired_table(rows, low, high):
    lines = ["| organ | FP rises (seeds) | p | mean FP change (ml), 95% CI | FN falls (seeds) | p | "
             "mean FN change (ml), 95% CI |", "|---|---|---|---|---|---|---|"]
    pick = [r for r in rows if r["low"] == low and r["high"] == high]
    for organ in dict.fromkeys(r["organ"] for r in pick):
        fp = next(r for r in pick if r["organ"] == organ and r["metric"] == "fp_ml")
        fn = next(r for r in pick if r["organ"] == organ and r["metric"] == "fn_ml")
        lines.append(f"| {organ} | {fp['n_higher']}/{fp['n_seeds']} | {_num(fp['p_higher'])} | {_ml(fp['mean_change'])} "
                     f"[{_ml(fp['ci_low'])}, {_ml(fp['ci_high'])}] | {fn['n_lower']}/{fn['n_seeds']} | "
                     f"{_num(fn['p_lower'])} | {_ml(fn['mean_change'])} [{_ml(fn['ci_low'])}, {_ml(fn['ci_high'])}] |")
    return lines


def compare_paired_table(rows):
    """The first loss against each other one, seed by seed (compare_paired.csv)."""
    scopes = list(dict.fromkeys(r["scope"] for r in rows))
    names = {"all": "mean Dice over organs", "small": "small-organ Dice"}
    lines = ["| against | " + " | ".join(f"{names.get(s, s)}: higher (seeds) | p | mean difference, 95% CI"
                                     for s in scopes) + " |", "|---|" + "---|---|---|" * len(scopes)]
    for against in dict.fromkeys(r["against_loss"] + "\t" + r["against_options"] for r in rows):
        name, options = against.split("\t")
        cells = []
        for scope in scopes:
            r = next(r for r in rows if r["against_loss"] == name and r["against_options"] == options
                     and r["scope"] == scope)
            higher, lower = int(r["n_higher"]), int(r["n_lower"])
            p = r["p_higher"] if higher >= lower else r["p_lower"]
            cells += [f"{higher}/{r['n_seeds']}", f"{_num(p)} ({'higher' if higher >= lower else 'lower'})",
                      f"{float(r['mean_change']):+.3f} [{float(r['ci_low']):+.3f}, {float(r['ci_high']):+.3f}]"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default="results")
    ap.add_argument("--out", default=os.path.join("docs", "results_tables.md"))
    args = ap.parse_args()
    lines = ["# Study tables", "",
             "Written by `python scripts/results_tables.py` from the CSVs under `results/` (`make study` runs it). "
             "Mean ± sample standard deviation over seeds. A run collapses when an organ is painted (false positives "
             "over 10x its true volume on the validation split) or missed (under 10% of its voxels found). "
             "p: one-sided exact sign test over seeds (ties dropped); CI: 95% bootstrap interval of the mean change.",
             ""]
    for dataset, title in (("phantom", "Phantom"), ("totalseg_ct", "CT sample")):
        folder = os.path.join(args.results, dataset)
        compare = _read(os.path.join(folder, "compare.csv"))
        if compare:
            lines += [f"## {title}: loss comparison", ""] + compare_table(compare) + [""]
            paired = _read(os.path.join(folder, "compare_paired.csv"))
            if paired:
                first = paired[0]["loss"]
                lines += [f"Seed by seed, {first} against each other loss (its Dice minus the other's; p: one-sided "
                          "sign test in the direction of the majority):", ""] + compare_paired_table(paired) + [""]
        for param in ("loss.beta", "loss.alpha"):
            sweep = _read(os.path.join(folder, f"sweep_{param}.csv"))
            if not sweep:
                continue
            lines += [f"## {title}: {param} sweep", ""] + sweep_table(sweep, param) + [""]
            paired = _read(os.path.join(folder, f"sweep_{param}_paired.csv"))
            if paired and param == "loss.beta":
                values = sorted({r["low"] for r in paired} | {r["high"] for r in paired}, key=float)
                lines += [f"Seed by seed, {param} = {values[0]} against {values[-1]}:", ""]
                lines += paired_table(paired, values[0], values[-1]) + [""]
    with open(args.out, "w") as f:
        f.write("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
