"""Studies: target grammar, overrides, tables from hand-made summaries, the runner (with a stand-in train.py),
and a smoke run of compare and sweep on the tiny config with real trainings."""

import csv
import json
import math
import os

import pytest

from combo_jax import config as config_lib
from combo_jax.experiments import cli, plan, report, results, runner, stats
from combo_jax.experiments.plan import StudyError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")
ORGANS = ("liver", "spleen", "kidney_right", "kidney_left", "pancreas", "adrenal")
SHARES = {"liver": 0.1, "spleen": 0.03, "kidney_right": 0.012, "kidney_left": 0.011, "pancreas": 0.004, "adrenal": 0.001}


def _organ(**over):
    row = {"dice": 0.9, "precision": 0.9, "recall": 0.9, "fp_voxels": 50, "fn_voxels": 50, "true_voxels": 1000,
           "hd95_mm": 2.0, "msd_mm": 1.0, "nsd": 0.9}
    row.update(over)
    return row


def _write_summary(run, organs: dict, *, mean_fg_dice: float, config: dict | None = None):
    """A summary.json as training writes it, with the given per-organ rows (others default)."""
    config = run.config if config is None else config
    rows = {name: {**_organ(**organs.get(name, {})), "share": SHARES[name]} for name in ORGANS}
    summary = {"loss": config["loss"], "config": config, "steps": 4, "elapsed_s": 1.5, "mean_fg_dice": mean_fg_dice,
               "voxel_volume_ml": 0.001, "organs": rows}
    os.makedirs(run.workdir, exist_ok=True)
    with open(run.summary_path, "w") as f:
        json.dump(summary, f)


def _csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _row(rows, **match):
    found = [r for r in rows if all(r[k] == v for k, v in match.items())]
    assert len(found) == 1, (match, found)
    return found[0]


# --------------------------------------------------------------------------------------------------
# Target grammar and overrides
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("recall>=0.95:pancreas", ("recall", ">=", 0.95, "pancreas")),
        ("  fp_ml <= 0.5 : all ", ("fp_ml", "<=", 0.5, "all")),
        ("DICE>0.8:small", ("dice", ">", 0.8, "small")),
        ("hd95_mm<1e1:adrenal", ("hd95_mm", "<", 10.0, "adrenal")),
    ],
)
def test_target_grammar_parses(text, expected):
    t = results.parse_target(text, organs=ORGANS)
    assert (t.metric, t.op, t.threshold, t.scope) == expected


@pytest.mark.parametrize(
    "text, message",
    [
        ("recall=>0.95:pancreas", "expected METRIC OP THRESHOLD:SCOPE"),
        ("recall>=0.95", "expected METRIC OP THRESHOLD:SCOPE"),
        ("recall 0.95:pancreas", "expected METRIC OP THRESHOLD:SCOPE"),
        ("recal>=0.95:pancreas", "unknown metric 'recal'; expected one of dice, precision, recall"),
        ("recall>=high:pancreas", "threshold 'high' is not a number"),
        ("recall>=inf:pancreas", "threshold must be finite"),
        ("recall>=0.95:pancrea", "unknown organ 'pancrea'; expected 'all', 'small' or one of liver"),
    ],
)
def test_target_grammar_rejects_with_a_clear_message(text, message):
    with pytest.raises(StudyError, match=r"--target") as err:
        results.parse_target(text, organs=ORGANS)
    assert message in str(err.value)


def test_target_met_and_shortfall():
    t = results.parse_target("recall>=0.9:pancreas")
    assert t.met(0.9) and t.met(0.95) and not t.met(0.85) and not t.met(math.nan)
    assert t.shortfall(0.95) == 0.0 and t.shortfall(0.85) == pytest.approx(0.05) and t.shortfall(math.nan) == math.inf
    u = results.parse_target("hd95_mm<=5:all")
    assert not u.met(math.inf) and u.shortfall(math.inf) == math.inf


def test_override_values_parse_as_the_field_type():
    """--set values go through ml_collections' own parser: as train.py's --config.KEY=VALUE."""
    config = config_lib.load_config(f"{TINY}:combo", ["train.num_steps=40", "loss.beta=0.3", "loss.batch_dice=True",
                                                      "model.features=(4, 8, 16)", "model.norm=group"])
    assert config.train.num_steps == 40 and config.loss.beta == 0.3 and isinstance(config.loss.beta, float)
    assert config.loss.batch_dice is True and config.model.features == (4, 8, 16) and config.model.norm == "group"
    assert plan.format_value(0.1) == "0.1" and plan.format_value(True) == "true" and plan.format_value((4, 8)) == "(4, 8)"
    with pytest.raises(config_lib.ConfigError, match=r"train.num_steps=0.5"):
        config_lib.load_config(TINY, ["train.num_steps=0.5"])
    with pytest.raises(config_lib.ConfigError, match=r"loss.batch_dice=maybe"):
        config_lib.load_config(TINY, ["loss.batch_dice=maybe"])
    with pytest.raises(config_lib.ConfigError, match=r"config.train.num_step: config.train has no field 'num_step' \(its fields: .*num_steps"):
        config_lib.load_config(TINY, ["train.num_step=4"])
    with pytest.raises(config_lib.ConfigError, match=r"config.train is a section"):
        config_lib.load_config(TINY, ["train=4"])


def test_plan_errors_before_training(tmp_path):
    out = str(tmp_path)
    with pytest.raises(StudyError, match=r"--set seed=\.\.\.: seed is set by the study itself"):
        plan.plan_compare(config=TINY, losses=["combo"], seeds=[0], out=out, sets={"seed": "3"})
    with pytest.raises(StudyError, match=r"--set loss.betta: no loss of combo, dice has that option"):
        plan.plan_compare(config=TINY, losses=["combo", "dice"], seeds=[0], out=out, sets={"loss.betta": "1"})
    with pytest.raises(StudyError, match=r"unknown loss 'dicey'"):
        plan.plan_compare(config=TINY, losses=["dicey"], seeds=[0], out=out, sets={})
    with pytest.raises(StudyError, match=r"--values: '0.50' repeats the value 0.5"):
        plan.plan_sweep(config=TINY, param="loss.beta", values=["0.5", "0.50"], seeds=[0], out=out, sets={})
    with pytest.raises(StudyError, match=r"--param loss.gamma: config.loss.gamma is not an option of loss 'combo'"):
        plan.plan_sweep(config=TINY, param="loss.gamma", values=["1"], seeds=[0], out=out, sets={})
    # A loss option that only some compared losses take goes to those that take it.
    runs = plan.plan_compare(config=TINY, losses=["combo", "dice"], seeds=[0], out=out, sets={"loss.beta": "0.3"})
    assert [r.config["loss"].get("beta") for r in runs] == [0.3, None]
    assert "--config.loss.beta=0.3" in runs[0].command() and not any("beta" in a for a in runs[1].command())


def test_workdir_of_another_configuration_is_refused(tmp_path):
    runs = plan.plan_compare(config=TINY, losses=["combo"], seeds=[0], out=str(tmp_path), sets={})
    other = json.loads(json.dumps(runs[0].config))
    other["loss"]["beta"] = 0.7
    _write_summary(runs[0], {}, mean_fg_dice=0.5, config=other)
    with pytest.raises(StudyError, match=r"combo_seed0 \(summary.json\) holds a different run:\s+config.loss.beta: 0.7 in the saved run, 0.5 now"):
        plan.check_workdirs(runs)
    with pytest.raises(StudyError, match=r"records another configuration than its run: config.loss.beta"):
        results.read_run(runs[0])


def test_slots_pin_gpus_and_split_cpu_cores():
    slots = runner.make_slots(devices="0,1", parallel=None)
    assert [s.env for s in slots] == [{"CUDA_VISIBLE_DEVICES": "0"}, {"CUDA_VISIBLE_DEVICES": "1"}]
    slots = runner.make_slots(devices="3,5", parallel=3)
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in slots] == ["3", "5", "3"]
    assert all(s.env["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false" for s in slots)
    assert [s.env for s in runner.make_slots(devices="cpu", parallel=None)] == [{"JAX_PLATFORMS": "cpu"}]
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) >= 2:
        slots = runner.make_slots(devices="cpu", parallel=2)
        assert set(slots[0].cores) | set(slots[1].cores) == set(cores) and not set(slots[0].cores) & set(slots[1].cores)
    with pytest.raises(StudyError, match=r"--parallel .* is more than the .* CPU cores"):
        runner.make_slots(devices="cpu", parallel=len(cores) + 1)


# --------------------------------------------------------------------------------------------------
# Tables from hand-made summaries (expected values computed by hand)
# --------------------------------------------------------------------------------------------------


def test_compare_tables_from_hand_made_summaries(tmp_path):
    out = str(tmp_path)
    runs = plan.plan_compare(config=TINY, losses=["combo", "dice"], seeds=[0, 1], out=out, sets={})
    by_name = {r.name: r for r in runs}
    _write_summary(by_name["combo_seed0"], {
        "pancreas": _organ(dice=0.6, fp_voxels=1000), "adrenal": _organ(dice=0.4, fp_voxels=500, hd95_mm=None),
        "spleen": _organ(hd95_mm=float("inf"))}, mean_fg_dice=0.7)
    _write_summary(by_name["combo_seed1"], {
        "pancreas": _organ(dice=0.8, fp_voxels=3000), "adrenal": _organ(dice=0.2, fp_voxels=500, hd95_mm=5.0)},
        mean_fg_dice=0.8)
    for seed in (0, 1):
        _write_summary(by_name[f"dice_seed{seed}"], {"pancreas": _organ(dice=0.5)}, mean_fg_dice=0.6)
    report.write_compare(runs, out, argv=["compare"])

    rows = _csv(tmp_path / "compare.csv")
    combo_options = json.dumps({k: v for k, v in runs[0].config["loss"].items() if k != "name"})
    pancreas = _row(rows, loss="combo", organ="pancreas")
    assert json.loads(pancreas["options"]) == json.loads(combo_options) and pancreas["runs"] == "combo_seed0;combo_seed1"
    assert float(pancreas["dice_mean"]) == pytest.approx(0.7)
    assert float(pancreas["dice_std"]) == pytest.approx(math.sqrt(0.02))  # sample std of 0.6, 0.8
    assert float(pancreas["fp_ml_mean"]) == pytest.approx(2.0)  # 1000 and 3000 voxels of 1 mm^3
    assert float(pancreas["share"]) == pytest.approx(0.004)
    small = _row(rows, loss="combo", organ="small")  # pancreas and adrenal are under 0.5%
    assert float(small["share"]) == pytest.approx(0.005)
    assert float(small["dice_mean"]) == pytest.approx(0.5) and float(small["dice_std"]) == pytest.approx(0.0)
    assert float(small["fp_ml_mean"]) == pytest.approx((1.5 + 3.5) / 2)
    assert _row(rows, loss="combo", organ="spleen")["hd95_mm_mean"] == "inf"
    assert float(_row(rows, loss="combo", organ="adrenal")["hd95_mm_mean"]) == pytest.approx(5.0)  # None is n/a
    assert float(_row(rows, loss="dice", organ="pancreas")["dice_mean"]) == pytest.approx(0.5)
    assert {r["organ"] for r in rows} == {*ORGANS, "small", "all"}

    per_run = _csv(tmp_path / "compare_runs.csv")
    assert len(per_run) == 4 * len(ORGANS)
    assert float(_row(per_run, run="combo_seed1", organ="pancreas")["fp_ml"]) == pytest.approx(3.0)

    md = (tmp_path / "compare.md").read_text()
    assert "## Small organs (under 0.5% of the voxels: pancreas 0.400%, adrenal 0.100%)" in md
    assert "| combo | 0.700 ± 0.141 | 0.900 | 0.900 | 2.00 | 0.050 | 2.0 |" in md  # pancreas row
    assert "| combo | 0.900 ± 0.000 | 0.900 | 0.900 | 0.050 | 0.050 | inf |" in md  # spleen: one seed inf
    assert "| dice | " in md and "include_background=True" in md

    # Seed by seed, combo against dice: mean Dice over the organs (0.9 x 4 + 0.6 + 0.4) / 6 and
    # (0.9 x 4 + 0.8 + 0.2) / 6 against (0.9 x 5 + 0.5) / 6; small organs 0.5 and 0.5 against 0.7.
    paired = _csv(tmp_path / "compare_paired.csv")
    every = _row(paired, loss="combo", against_loss="dice", scope="all")
    assert (every["n_seeds"], every["n_higher"], every["n_lower"]) == ("2", "0", "2")
    assert float(every["mean_change"]) == pytest.approx(4.6 / 6 - 5.0 / 6)
    assert float(every["p_lower"]) == pytest.approx(0.25) and float(every["p_higher"]) == pytest.approx(1.0)
    small_pair = _row(paired, loss="combo", against_loss="dice", scope="small")
    assert float(small_pair["mean_change"]) == pytest.approx(-0.2) and small_pair["n_lower"] == "2"
    assert "## Seed by seed: combo against each other loss" in md
    assert "| dice | 0/2 | 1.000 | 0.250 | -0.067 [-0.067, -0.067] | 0/2 | 1.000 | 0.250 | -0.200 [-0.200, -0.200] |" in md
    # A comparison of one loss in the same folder has nothing to pair: no stale seed-by-seed file is left.
    report.write_compare([r for r in runs if r.loss == "combo"], out, argv=["compare"])
    assert not os.path.exists(tmp_path / "compare_paired.csv")
    assert "## Seed by seed" not in (tmp_path / "compare.md").read_text()


def test_sweep_tables_targets_and_plot_from_hand_made_summaries(tmp_path):
    out = str(tmp_path)
    runs, base, default, values = plan.plan_sweep(config=TINY, param="loss.beta", values=["0.7", "0.3", "0.5"],
                                                          seeds=[0, 1], out=out, sets={})
    assert default == 0.5 and values == [0.7, 0.3, 0.5]
    names = {(r.value, r.seed): r for r in runs}
    assert names[(0.5, 0)].name == "combo_seed0" and names[(0.3, 1)].name == "combo_loss.beta=0.3_seed1"
    fp = {0.3: (100, 300), 0.5: (400, 600), 0.7: (900, 1100)}
    fn = {0.3: (900, 700), 0.5: (400, 400), 0.7: (100, 100)}
    recall = {0.3: (0.80, 0.84), 0.5: (0.90, 0.92), 0.7: (0.97, 0.95)}
    dice = {0.3: 0.80, 0.5: 0.85, 0.7: 0.83}
    for (value, seed), run in names.items():
        _write_summary(run, {"pancreas": _organ(fp_voxels=fp[value][seed], fn_voxels=fn[value][seed],
                                                recall=recall[value][seed])}, mean_fg_dice=dice[value])
    targets = [results.parse_target(t, organs=ORGANS) for t in
               ("recall>=0.9:pancreas", "recall>=0.95:pancreas", "fp_ml<=0.1:all")]
    result = report.write_sweep(runs, out, param="loss.beta", values=values, default=default, targets=targets)

    assert result["values"] == [0.3, 0.5, 0.7]
    chosen = [(c["best"]["value"], c["met"]) for c in result["choices"]]
    # 0.5 and 0.7 reach recall 0.91 and 0.96: the better Dice (0.85) wins; only 0.7 reaches 0.95; no value has
    # every organ's FP under 0.1 ml, and 0.3 (pancreas 0.2 ml) is the closest.
    assert chosen == [(0.5, True), (0.7, True), (0.3, False)]
    assert result["choices"][2]["best"]["shortfall"] == pytest.approx(0.1)

    rows = _csv(tmp_path / "sweep_loss.beta.csv")
    for value in (0.3, 0.5, 0.7):
        row = _row(rows, organ="pancreas", value=json.dumps(value))
        assert row["loss"] == "combo" and json.loads(row["options"])["beta"] == value
        assert float(row["fp_ml_mean"]) == pytest.approx(sum(fp[value]) / 2000)
        assert float(row["fn_ml_mean"]) == pytest.approx(sum(fn[value]) / 2000)
        assert float(row["recall_mean"]) == pytest.approx(sum(recall[value]) / 2)
    assert _row(rows, organ="pancreas", value="0.5")["runs"] == "combo_seed0;combo_seed1"
    md = (tmp_path / "sweep_loss.beta.md").read_text()
    assert "| pancreas | 0.400% | increasing (ρ = +1.00) | decreasing (ρ = -1.00) | constant | increasing (ρ = +1.00) |" in md
    assert "**Choice: loss.beta = 0.7** (meets the target" in md
    assert "| pancreas* | 0.900 → 0.900 (0.000) | 0.900 → 0.900 (0.000) | 0.910 → 0.960 (+0.050) | 0.500 → 1.00 (+0.500) |" in md
    assert "**Choice: loss.beta = 0.3** (no value meets the target; this one comes closest" in md
    assert os.path.getsize(tmp_path / "sweep_loss.beta.png") > 10_000

    # A run whose summary records another beta than its name says is refused, not tabulated.
    wrong = json.loads(json.dumps(names[(0.3, 0)].config))
    wrong["loss"]["beta"] = 0.9
    _write_summary(names[(0.3, 0)], {}, mean_fg_dice=0.5, config=wrong)
    with pytest.raises(StudyError, match=r"combo_loss.beta=0.3_seed0/summary.json records another configuration"):
        report.write_sweep(runs, out, param="loss.beta", values=values, default=default)


def test_collapses_and_seed_by_seed_signs_from_hand_made_summaries(tmp_path):
    out = str(tmp_path)
    seeds = [0, 1, 2, 3, 4]
    runs, _, default, values = plan.plan_sweep(config=TINY, param="loss.beta", values=["0.1", "0.9"],
                                                      seeds=seeds, out=out, sets={})
    by = {(r.value, r.seed): r for r in runs}
    # pancreas (1000 true voxels): FP rises from 0.1 to 0.9 in seeds 0-3 and is tied in seed 4; FN falls in
    # seeds 0-2 and rises in 3-4. Seed 1 at beta 0.9 paints the adrenal (10001 > 10 x 1000 FP voxels);
    # seed 2 at beta 0.1 misses it (recall 0.05); seed 3 at 0.9 has exactly 10x (not a collapse).
    fp = {0.1: [100, 100, 100, 100, 100], 0.9: [200, 300, 400, 500, 100]}
    fn = {0.1: [500, 500, 500, 500, 500], 0.9: [400, 300, 200, 600, 700]}
    adrenal = {(0.9, 1): {"fp_voxels": 10001}, (0.1, 2): {"recall": 0.05}, (0.9, 3): {"fp_voxels": 10000}}
    for (value, seed), run in by.items():
        i = seeds.index(seed)
        _write_summary(run, {"pancreas": _organ(fp_voxels=fp[value][i], fn_voxels=fn[value][i]),
                             "adrenal": _organ(**adrenal.get((value, seed), {}))}, mean_fg_dice=0.8)
    report.write_sweep(runs, out, param="loss.beta", values=values, default=default)

    rows = _csv(tmp_path / "sweep_loss.beta.csv")
    high = _row(rows, organ="adrenal", value="0.9")
    assert (high["n_collapsed"], high["collapsed_seeds"], high["painted_seeds"], high["missed_seeds"]) == ("1", "1", "1", "")
    low = _row(rows, organ="adrenal", value="0.1")
    assert (low["n_collapsed"], low["missed_seeds"]) == ("1", "2")
    assert _row(rows, organ="pancreas", value="0.9")["n_collapsed"] == "0"
    assert _row(rows, organ="all", value="0.9")["collapsed_seeds"] == "1"

    paired = _csv(tmp_path / "sweep_loss.beta_paired.csv")
    pfp = _row(paired, organ="pancreas", metric="fp_ml")
    assert (pfp["low"], pfp["high"], pfp["n_seeds"], pfp["n_higher"], pfp["n_lower"], pfp["n_tied"]) == ("0.1", "0.9", "5", "4", "0", "1")
    assert float(pfp["p_higher"]) == pytest.approx(1 / 16)  # 4 of 4 untied seeds
    assert float(pfp["mean_change"]) == pytest.approx(0.2)  # (0.1 + 0.2 + 0.3 + 0.4 + 0) / 5 ml
    pfn = _row(paired, organ="pancreas", metric="fn_ml")
    assert (pfn["n_higher"], pfn["n_lower"]) == ("2", "3")
    assert float(pfn["p_lower"]) == pytest.approx(16 / 32)  # P(X >= 3), X ~ Bin(5, 1/2)

    md = (tmp_path / "sweep_loss.beta.md").read_text()
    assert "| loss.beta = 0.1 | 1/5 | seed 2: adrenal missed |" in md
    assert "| loss.beta = 0.9 | 1/5 | seed 1: adrenal painted |" in md
    assert "## Seed by seed: loss.beta = 0.1 against 0.9" in md
    line = next(x for x in md.splitlines() if x.startswith("| pancreas | 4/5 | 0.062 | ["))
    lo, hi = (float(x) for x in line.split("[")[1].split("]")[0].split(","))
    assert 0.0 <= lo < 0.2 < hi <= 0.4  # the mean change 0.2 ml lies inside its bootstrap interval
    assert "| 3/5 | 0.500 |" in line  # FN falls in seeds 0-2
    assert md.count("| 1/5 | combo_") == 2  # the "collapsed seeds" column of the overview

    compare = plan.plan_compare(config=TINY, losses=["combo", "dice"], seeds=[0, 1], out=out, sets={})
    for run in compare:
        painted = run.name == "combo_seed1"
        _write_summary(run, {"pancreas": _organ(fp_voxels=20000 if painted else 50)}, mean_fg_dice=0.8)
    report.write_compare(compare, out)
    md = (tmp_path / "compare.md").read_text()
    assert "| combo | 1/2 | seed 1: pancreas painted |" in md and "| dice | 0/2 | none |" in md
    assert _row(_csv(tmp_path / "compare.csv"), loss="combo", organ="pancreas")["painted_seeds"] == "1"


# --------------------------------------------------------------------------------------------------
# The runner, with a stand-in for combo_jax.train (no jax: milliseconds per run)
# --------------------------------------------------------------------------------------------------

FAKE_TRAIN = r'''
import json, os, sys
args = dict(a[2:].split("=", 1) for a in sys.argv[1:])
workdir = args["workdir"]
with open(os.path.join(workdir, "launches.jsonl"), "a") as f:
    f.write(json.dumps({"cuda": os.environ.get("CUDA_VISIBLE_DEVICES"), "cores": sorted(os.sched_getaffinity(0))}) + "\n")
stop_once = os.path.join(workdir, "stop_once")
if os.path.basename(workdir) == os.environ.get("FAKE_STOP") and not os.path.exists(stop_once):
    open(stop_once, "w").close()
    sys.exit(143)  # like a training stopped by SIGTERM: exit 128 + 15, no summary.json
config = json.load(open(os.path.join(workdir, "experiment.json")))["config"]
assert config["seed"] == int(args["config.seed"])
organs = {o: {"dice": 0.5, "precision": 0.5, "recall": 0.5, "fp_voxels": 1, "fn_voxels": 1, "true_voxels": 9}
          for o in ("liver", "spleen", "kidney_right", "kidney_left", "pancreas", "adrenal")}
json.dump({"loss": config["loss"], "config": config, "steps": 1, "elapsed_s": 0.1, "mean_fg_dice": 0.5,
           "voxel_volume_ml": 0.001, "organs": organs}, open(os.path.join(workdir, "summary.json"), "w"))
'''


def test_runner_skips_finished_reruns_unfinished_and_pins_slots(tmp_path, monkeypatch):
    (tmp_path / "fake_train.py").write_text(FAKE_TRAIN)
    monkeypatch.setattr(plan, "TRAIN_MODULE", "fake_train")
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    monkeypatch.setenv("FAKE_STOP", "dice_seed1")
    out = str(tmp_path / "study")
    runs = plan.plan_compare(config=TINY, losses=["combo", "dice"], seeds=[0, 1], out=out, sets={})
    _write_summary(runs[0], {}, mean_fg_dice=0.9)  # combo_seed0 is finished before the study starts
    slots = runner.make_slots(devices="4,7", parallel=2)
    lines = []

    with pytest.raises(StudyError, match=r"1 run\(s\) failed .*dice_seed1 \(stopped by signal 15"):
        runner.run_study(runs, slots=slots, out=out, argv=["compare"], log=lines.append)
    text = "\n".join(lines)
    assert "skip combo_seed0: finished" in text and "study: 4 runs, 1 already finished, 3 to train on 2 slot(s)" in text
    assert "[3/4 done, " in text

    def launches(name):
        path = os.path.join(out, "runs", name, "launches.jsonl")
        return [json.loads(x) for x in open(path)] if os.path.exists(path) else []

    assert launches("combo_seed0") == []
    seen = [launches(n)[0]["cuda"] for n in ("combo_seed1", "dice_seed0", "dice_seed1")]
    assert set(seen) <= {"4", "7"} and len(set(seen)) == 2  # two slots, one GPU each
    lines.clear()
    runner.run_study(runs, slots=slots, out=out, argv=["compare"], log=lines.append)  # resumes the unfinished run
    assert [len(launches(n)) for n in ("combo_seed0", "combo_seed1", "dice_seed0", "dice_seed1")] == [0, 1, 1, 2]
    assert "study: 4 runs, 3 already finished, 1 to train" in "\n".join(lines)
    study = json.load(open(os.path.join(out, "study.json")))
    statuses = [{r["name"]: r["status"] for r in inv["runs"]} for inv in study["invocations"]]
    assert statuses[0]["dice_seed1"].startswith("failed") and statuses[0]["combo_seed0"] == "skipped (finished)"
    assert statuses[1] == {"combo_seed0": "skipped (finished)", "combo_seed1": "skipped (finished)",
                           "dice_seed0": "skipped (finished)", "dice_seed1": "trained"}
    assert all(inv["wall_s"] >= 0 and inv["command"].startswith("python -m combo_jax.experiments") for inv in study["invocations"])

    cores = sorted(os.sched_getaffinity(0))
    if len(cores) >= 2:  # CPU slots: each run pinned to its own share of the cores
        out2 = str(tmp_path / "cpu")
        runs2 = plan.plan_compare(config=TINY, losses=["combo", "dice"], seeds=[0], out=out2, sets={})
        runner.run_study(runs2, slots=runner.make_slots(devices="cpu", parallel=2), out=out2, argv=[],
                              log=lambda _: None)
        pinned = [json.loads(open(os.path.join(r.workdir, "launches.jsonl")).readline())["cores"] for r in runs2]
        assert all(0 < len(p) < len(cores) for p in pinned)


# --------------------------------------------------------------------------------------------------
# Smoke run: real trainings of the tiny config through python -m combo_jax.train
# --------------------------------------------------------------------------------------------------

TINY_SETS = ["--set", "train.num_steps=2", "--set", "train.eval_every=2", "--set", "train.checkpoint_every=2",
             "--set", "data.num_train=8", "--set", "eval.num_predictions=0"]


def test_smoke_compare_and_sweep_on_the_tiny_config(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("XLA_FLAGS", raising=False)  # each training on one CPU device, not the 8 fake ones
    out = str(tmp_path / "study")
    # One run at a time: the second finds the first one's compilations in the study's cache (the slots of
    # --parallel are tested above with a stand-in train.py).
    compare = ["compare", "--config", TINY, "--losses", "combo,wce", "--seeds", "1", "--out", out, "--devices", "cpu",
               *TINY_SETS]
    assert cli.main(compare) == 0
    assert cli.main(["sweep", "--config", TINY, "--param", "loss.beta", "--values", "0.3,0.5", "--seeds", "1",
                             "--out", out, "--target", "recall>=0.5:pancreas", *TINY_SETS]) == 0
    log = capsys.readouterr().out
    assert "skip combo_seed0: finished" in log  # the beta = 0.5 point is the compare run
    for name in ("compare.md", "compare.csv", "compare_runs.csv", "sweep_loss.beta.md", "sweep_loss.beta.csv"):
        assert os.path.getsize(os.path.join(out, name)) > 200, name
    assert os.path.getsize(os.path.join(out, "sweep_loss.beta.png")) > 10_000

    def summary(run_name):
        with open(os.path.join(out, "runs", run_name, "summary.json")) as f:
            return json.load(f)

    # Every row's loss name and options are those its own runs recorded.
    for row in _csv(os.path.join(out, "compare.csv")):
        for run_name in row["runs"].split(";"):
            loss = dict(summary(run_name)["loss"])
            assert row["loss"] == loss.pop("name") == run_name.split("_seed")[0]
            assert json.loads(row["options"]) == loss
    per_run = _csv(os.path.join(out, "compare_runs.csv"))
    assert {r["run"] for r in per_run} == {"combo_seed0", "wce_seed0"}
    for row in per_run:
        s = summary(row["run"])
        assert row["loss"] == s["loss"]["name"]
        assert int(row["fp_voxels"]) == s["organs"][row["organ"]]["fp_voxels"]
    sweep_rows = _csv(os.path.join(out, "sweep_loss.beta.csv"))
    assert {r["value"] for r in sweep_rows} == {"0.3", "0.5"}
    for row in sweep_rows:
        for run_name in row["runs"].split(";"):
            s = summary(run_name)
            assert json.loads(row["value"]) == s["config"]["loss"]["beta"] == s["loss"]["beta"]
            assert json.loads(row["options"])["beta"] == s["loss"]["beta"]
    assert "## Target `recall>=0.5:pancreas`" in open(os.path.join(out, "sweep_loss.beta.md")).read()

    # A second invocation trains nothing.
    mtimes = {n: os.path.getmtime(os.path.join(out, "runs", n, "summary.json")) for n in ("combo_seed0", "wce_seed0")}
    assert cli.main(compare) == 0
    log = capsys.readouterr().out
    assert "study: 2 runs, 2 already finished, 0 to train" in log
    assert mtimes == {n: os.path.getmtime(os.path.join(out, "runs", n, "summary.json")) for n in mtimes}
    study = json.load(open(os.path.join(out, "study.json")))
    assert len(study["invocations"]) == 3
    assert study["invocations"][0]["devices"]["platform"] == "cpu"
    assert {r["status"] for r in study["invocations"][0]["runs"]} == {"trained"}
    assert {r["status"] for r in study["invocations"][2]["runs"]} == {"skipped (finished)"}


# --------------------------------------------------------------------------------------------------
# Collapse detection, sign tests and bootstrap intervals (combo_jax.experiments.stats)
# --------------------------------------------------------------------------------------------------


def _stat_row(true=100, fp=10, recall=0.9):
    return {"true_voxels": true, "fp_voxels": fp, "recall": recall}


def _record(seed, **organs):
    rows = {"liver": _stat_row(true=5000, fp=100), "adrenal": _stat_row()}
    rows.update(organs)
    return {"run": f"combo_seed{seed}", "seed": seed, "organs": rows}


@pytest.mark.parametrize(
    "row, expected",
    [
        (_stat_row(true=235, fp=2351), "painted"),  # just over 10x the true volume
        (_stat_row(true=235, fp=2350), None),  # exactly 10x is not over it
        (_stat_row(true=235, fp=0, recall=0.05), "missed"),
        (_stat_row(true=235, fp=0, recall=0.1), None),  # a tenth found is found
        (_stat_row(true=235, fp=3000, recall=0.0), "painted"),  # painted wins when both hold
        (_stat_row(true=235, fp=0, recall=float("nan")), "missed"),  # true voxels but no recall recorded: nothing found
        (_stat_row(true=0, fp=500, recall=float("nan")), None),  # organ absent from the validation split
    ],
)
def test_organ_failure(row, expected):
    assert stats.organ_failure(row) == expected


def test_thresholds_are_options():
    assert stats.organ_failure(_stat_row(true=100, fp=300), fp_ratio=2.0) == "painted"
    assert stats.organ_failure(_stat_row(recall=0.4), min_recall=0.5) == "missed"


def test_count_collapses_names_seeds_and_organs():
    records = [
        _record(3, adrenal=_stat_row(recall=0.0, fp=0)),
        _record(0),
        _record(1, adrenal=_stat_row(fp=5000), liver=_stat_row(true=5000, fp=60000)),
        _record(2),
        _record(4, adrenal=_stat_row(fp=1001)),
    ]
    count = stats.count_collapses(records)
    assert count.n_runs == 5 and count.n_collapsed == 3
    assert count.collapsed_seeds == (1, 3, 4)
    assert count.painted == {"adrenal": (1, 4), "liver": (1,)}
    assert count.missed == {"adrenal": (3,)}
    assert count.describe() == ("3/5 (seed 1: liver painted, adrenal painted; seed 3: adrenal missed; "
                                "seed 4: adrenal painted)")
    assert stats.count_collapses([_record(0), _record(1)]).describe() == "0/2"


def test_sign_test_matches_the_binomial_tail():
    # P(X >= k) for X ~ Binomial(n, 1/2), by hand.
    assert stats.sign_test(5, 0) == pytest.approx(1 / 32)
    assert stats.sign_test(4, 1) == pytest.approx(6 / 32)
    assert stats.sign_test(0, 5) == pytest.approx(1.0)
    assert stats.sign_test(0, 0) == 1.0


def test_paired_counts_signs_by_seed_and_drops_ties():
    low = {0: 1.0, 1: 2.0, 2: 3.0, 3: 4.0, 4: 5.0, 9: 100.0}  # seed 9 has no partner
    high = {0: 2.0, 1: 2.5, 2: 3.0, 3: 6.0, 4: 4.0, 7: 0.0}
    p = stats.paired(low, high)
    assert p.seeds == (0, 1, 2, 3, 4)
    assert p.diffs == (1.0, 0.5, 0.0, 2.0, -1.0)
    assert (p.n_greater, p.n_less, p.n_tied) == (3, 1, 1)
    assert p.p_greater == pytest.approx(5 / 16)  # P(X >= 3), X ~ Bin(4, 1/2)
    assert p.p_less == pytest.approx(15 / 16)  # P(X >= 1)
    assert p.mean_diff == pytest.approx(0.5)
    lo, hi = p.interval
    assert -1.0 <= lo < 0.5 < hi <= 2.0
    # a tolerance turns small differences into ties
    assert stats.paired(low, high, tolerance=0.6).n_tied == 2
    with pytest.raises(ValueError, match="no seed in common"):
        stats.paired({0: 1.0}, {1: 1.0})


def test_bootstrap_interval():
    assert stats.bootstrap_mean_interval([2.0, 2.0, 2.0]) == (2.0, 2.0)
    a = stats.bootstrap_mean_interval([1.0, 2.0, 3.0, 10.0])
    assert a == stats.bootstrap_mean_interval([1.0, 2.0, 3.0, 10.0])  # deterministic
    assert 1.0 <= a[0] < 4.0 < a[1] <= 10.0
    assert all(math.isnan(x) for x in stats.bootstrap_mean_interval([]))


def test_direction_counts_fp_up_and_fn_down_per_seed():
    def rec(seed, fp, fn):
        return {"seed": seed, "organs": {"pancreas": {"fp_ml": fp, "fn_ml": fn}}}

    low = [rec(0, 1.0, 5.0), rec(1, 1.0, 5.0), rec(2, 1.0, 5.0), rec(3, 1.0, 5.0)]
    high = [rec(0, 2.0, 4.0), rec(1, 3.0, 6.0), rec(2, 0.5, 3.0), rec(3, 1.5, 1.0)]
    d = stats.direction(low, high, "pancreas")
    assert (d.fp.n_greater, d.fn.n_less, d.n_both) == (3, 3, 2)
    assert d.cells()[0] == "3/4" and d.cells()[3] == "3/4" and d.cells()[-1] == "2/4"
    with pytest.raises(ValueError, match="two runs with seed 0"):
        stats.direction(low + [rec(0, 1.0, 1.0)], high, "pancreas")
