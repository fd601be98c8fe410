"""Collapse detection, sign tests and bootstrap intervals on hand-built records with known answers."""

import math

import pytest

from combo_jax import study_stats


def _row(true=100, fp=10, recall=0.9):
    return {"true_voxels": true, "fp_voxels": fp, "recall": recall}


def _record(seed, **organs):
    rows = {"liver": _row(true=5000, fp=100), "adrenal": _row()}
    rows.update(organs)
    return {"run": f"combo_seed{seed}", "seed": seed, "organs": rows}


@pytest.mark.parametrize(
    "row, expected",
    [
        (_row(true=235, fp=2351), "painted"),  # just over 10x the true volume
        (_row(true=235, fp=2350), None),  # exactly 10x is not over it
        (_row(true=235, fp=0, recall=0.05), "missed"),
        (_row(true=235, fp=0, recall=0.1), None),  # a tenth found is found
        (_row(true=235, fp=3000, recall=0.0), "painted"),  # painted wins when both hold
        (_row(true=235, fp=0, recall=float("nan")), "missed"),  # true voxels but no recall recorded: nothing found
        (_row(true=0, fp=500, recall=float("nan")), None),  # organ absent from the validation split
    ],
)
def test_organ_failure(row, expected):
    assert study_stats.organ_failure(row) == expected


def test_thresholds_are_options():
    assert study_stats.organ_failure(_row(true=100, fp=300), fp_ratio=2.0) == "painted"
    assert study_stats.organ_failure(_row(recall=0.4), min_recall=0.5) == "missed"


def test_count_collapses_names_seeds_and_organs():
    records = [
        _record(3, adrenal=_row(recall=0.0, fp=0)),
        _record(0),
        _record(1, adrenal=_row(fp=5000), liver=_row(true=5000, fp=60000)),
        _record(2),
        _record(4, adrenal=_row(fp=1001)),
    ]
    count = study_stats.count_collapses(records)
    assert count.n_runs == 5 and count.n_collapsed == 3
    assert count.collapsed_seeds == (1, 3, 4)
    assert count.painted == {"adrenal": (1, 4), "liver": (1,)}
    assert count.missed == {"adrenal": (3,)}
    assert count.describe() == ("3/5 (seed 1: liver painted, adrenal painted; seed 3: adrenal missed; "
                                "seed 4: adrenal painted)")
    assert study_stats.count_collapses([_record(0), _record(1)]).describe() == "0/2"


def test_sign_test_matches_the_binomial_tail():
    # P(X >= k) for X ~ Binomial(n, 1/2), by hand.
    assert study_stats.sign_test(5, 0) == pytest.approx(1 / 32)
    assert study_stats.sign_test(4, 1) == pytest.approx(6 / 32)
    assert study_stats.sign_test(0, 5) == pytest.approx(1.0)
    assert study_stats.sign_test(0, 0) == 1.0


def test_paired_counts_signs_by_seed_and_drops_ties():
    low = {0: 1.0, 1: 2.0, 2: 3.0, 3: 4.0, 4: 5.0, 9: 100.0}  # seed 9 has no partner
    high = {0: 2.0, 1: 2.5, 2: 3.0, 3: 6.0, 4: 4.0, 7: 0.0}
    p = study_stats.paired(low, high)
    assert p.seeds == (0, 1, 2, 3, 4)
    assert p.diffs == (1.0, 0.5, 0.0, 2.0, -1.0)
    assert (p.n_greater, p.n_less, p.n_tied) == (3, 1, 1)
    assert p.p_greater == pytest.approx(5 / 16)  # P(X >= 3), X ~ Bin(4, 1/2)
    assert p.p_less == pytest.approx(15 / 16)  # P(X >= 1)
    assert p.mean_diff == pytest.approx(0.5)
    lo, hi = p.interval
    assert -1.0 <= lo < 0.5 < hi <= 2.0
    # a tolerance turns small differences into ties
    assert study_stats.paired(low, high, tolerance=0.6).n_tied == 2
    with pytest.raises(ValueError, match="no seed in common"):
        study_stats.paired({0: 1.0}, {1: 1.0})


def test_bootstrap_interval():
    assert study_stats.bootstrap_mean_interval([2.0, 2.0, 2.0]) == (2.0, 2.0)
    a = study_stats.bootstrap_mean_interval([1.0, 2.0, 3.0, 10.0])
    assert a == study_stats.bootstrap_mean_interval([1.0, 2.0, 3.0, 10.0])  # deterministic
    assert 1.0 <= a[0] < 4.0 < a[1] <= 10.0
    assert all(math.isnan(x) for x in study_stats.bootstrap_mean_interval([]))


def test_direction_counts_fp_up_and_fn_down_per_seed():
    def rec(seed, fp, fn):
        return {"seed": seed, "organs": {"pancreas": {"fp_ml": fp, "fn_ml": fn}}}

    low = [rec(0, 1.0, 5.0), rec(1, 1.0, 5.0), rec(2, 1.0, 5.0), rec(3, 1.0, 5.0)]
    high = [rec(0, 2.0, 4.0), rec(1, 3.0, 6.0), rec(2, 0.5, 3.0), rec(3, 1.5, 1.0)]
    d = study_stats.direction(low, high, "pancreas")
    assert (d.fp.n_greater, d.fn.n_less, d.n_both) == (3, 3, 2)
    assert d.cells()[0] == "3/4" and d.cells()[3] == "3/4" and d.cells()[-1] == "2/4"
    with pytest.raises(ValueError, match="two runs with seed 0"):
        study_stats.direction(low + [rec(0, 1.0, 1.0)], high, "pancreas")
