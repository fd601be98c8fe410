"""Statistics over the seeds of a study: collapsed runs, and per-seed paired comparisons of two settings.

A study trains every setting with several seeds (``config.seed``: initial parameters and batch order, the data
fixed). Means hide the two ways a segmentation run fails outright, so each run is also classified per organ:

* **painted**: the organ's false-positive volume exceeds ``fp_ratio`` (10) times its true volume on the
  validation split: the network paints it over tissue that is not the organ;
* **missed**: the network finds under ``min_recall`` (10%) of the organ's voxels.

A run **collapses** when at least one organ is painted or missed. An organ absent from the validation split
(no true voxel) is neither.

Two settings are compared seed by seed: the run with seed s of setting A against the run with seed s of
setting B (same initial parameters, same batches). For a metric (say false-positive volume) the sign test
counts the seeds where B > A and where B < A, drops ties, and gives the exact binomial probability of at least
that many B > A under "no effect" (each sign equally likely); the bootstrap interval is a percentile interval
of the mean paired difference B - A over seeds resampled with replacement (deterministic: a fixed generator).

Records are the dictionaries of :func:`combo_jax.experiments.results.read_run`: ``{"run", "seed", "organs": {name:
{"fp_voxels", "true_voxels", "recall", ...}}}``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np

FP_RATIO = 10.0  # painted: false positives over this many times the true volume
MIN_RECALL = 0.1  # missed: under this fraction of the organ's voxels found


def organ_failure(row: Mapping, *, fp_ratio: float = FP_RATIO, min_recall: float = MIN_RECALL) -> str | None:
    """``"painted"``, ``"missed"`` or None for one organ of one run (a row of a summary's ``organs``).

    ``row`` needs ``true_voxels``, ``fp_voxels`` and ``recall``. Painted takes precedence: a run that paints an
    organ everywhere but on the organ itself is reported as painted.
    """
    true = float(row["true_voxels"])
    if not true > 0:
        return None
    if float(row["fp_voxels"]) > fp_ratio * true:
        return "painted"
    recall = float(row["recall"])
    if math.isnan(recall) or recall < min_recall:
        return "missed"
    return None


def run_failures(record: Mapping, **thresholds) -> dict[str, str]:
    """{organ: "painted" | "missed"} for the organs of one run that failed (empty: the run did not collapse)."""
    out = {}
    for organ, row in record["organs"].items():
        kind = organ_failure(row, **thresholds)
        if kind is not None:
            out[organ] = kind
    return out


@dataclasses.dataclass(frozen=True)
class CollapseCount:
    """The collapses among the runs (seeds) of one setting."""

    n_runs: int
    collapsed_seeds: tuple[int, ...]  # seeds whose run collapsed (any organ)
    painted: dict  # organ -> tuple of seeds where it was painted
    missed: dict  # organ -> tuple of seeds where it was missed

    @property
    def n_collapsed(self) -> int:
        return len(self.collapsed_seeds)

    def describe(self) -> str:
        """``"2/5 (seed 1: adrenal painted; seed 3: adrenal missed)"``, or ``"0/5"``."""
        if not self.collapsed_seeds:
            return f"0/{self.n_runs}"
        parts = []
        for seed in self.collapsed_seeds:
            what = [f"{o} painted" for o, seeds in self.painted.items() if seed in seeds]
            what += [f"{o} missed" for o, seeds in self.missed.items() if seed in seeds]
            parts.append(f"seed {seed}: {', '.join(what)}")
        return f"{self.n_collapsed}/{self.n_runs} ({'; '.join(parts)})"


def count_collapses(records: Sequence[Mapping], **thresholds) -> CollapseCount:
    """Collapses per organ and per seed over the runs of one setting."""
    painted: dict[str, list] = {}
    missed: dict[str, list] = {}
    collapsed = []
    for record in sorted(records, key=lambda r: r["seed"]):
        failures = run_failures(record, **thresholds)
        if failures:
            collapsed.append(int(record["seed"]))
        for organ, kind in failures.items():
            (painted if kind == "painted" else missed).setdefault(organ, []).append(int(record["seed"]))
    return CollapseCount(len(records), tuple(collapsed), {o: tuple(s) for o, s in painted.items()},
                         {o: tuple(s) for o, s in missed.items()})


def sign_test(n_greater: int, n_less: int) -> float:
    """One-sided exact sign test: P(at least ``n_greater`` of the non-tied pairs are "greater" | p = 1/2).

    1.0 when every pair is tied (no evidence either way).
    """
    from scipy import stats

    n = n_greater + n_less
    if n == 0:
        return 1.0
    return float(stats.binomtest(n_greater, n, 0.5, alternative="greater").pvalue)


def bootstrap_mean_interval(diffs: Sequence[float], *, confidence: float = 0.95, resamples: int = 10_000,
                            seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``diffs`` (resampled with replacement); (nan, nan) if empty."""
    values = np.asarray(diffs, np.float64)
    if values.size == 0 or not np.all(np.isfinite(values)):
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(resamples, values.size))].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    return float(np.quantile(means, tail)), float(np.quantile(means, 1.0 - tail))


@dataclasses.dataclass(frozen=True)
class Paired:
    """Setting B against setting A on one metric of one organ (or group), seed by seed."""

    seeds: tuple[int, ...]
    diffs: tuple[float, ...]  # B - A per seed
    n_greater: int  # seeds with B > A
    n_less: int  # seeds with B < A
    n_tied: int
    p_greater: float  # one-sided sign test for B > A
    p_less: float  # one-sided sign test for B < A
    mean_diff: float
    interval: tuple[float, float]  # bootstrap interval of the mean difference

    @property
    def n(self) -> int:
        return len(self.seeds)


def paired(a: Mapping[int, float], b: Mapping[int, float], *, tolerance: float = 0.0, confidence: float = 0.95) -> Paired:
    """Compares ``b[seed]`` with ``a[seed]`` over the seeds both have.

    A difference of at most ``tolerance`` in absolute value counts as a tie. Raises ValueError when the two
    share no seed.
    """
    seeds = tuple(sorted(set(a) & set(b)))
    if not seeds:
        raise ValueError(f"no seed in common: {sorted(a)} and {sorted(b)}")
    diffs = tuple(float(b[s]) - float(a[s]) for s in seeds)
    greater = sum(d > tolerance for d in diffs)
    less = sum(d < -tolerance for d in diffs)
    finite = [d for d in diffs if math.isfinite(d)]
    return Paired(
        seeds=seeds, diffs=diffs, n_greater=greater, n_less=less, n_tied=len(diffs) - greater - less,
        p_greater=sign_test(greater, less), p_less=sign_test(less, greater),
        mean_diff=float(np.mean(finite)) if finite else math.nan,
        interval=bootstrap_mean_interval(diffs, confidence=confidence),
    )


def by_seed(records: Sequence[Mapping], organ: str, metric: str) -> dict[int, float]:
    """{seed: the organ's metric} over the runs of one setting; two runs with one seed is an error."""
    out: dict[int, float] = {}
    for record in records:
        seed = int(record["seed"])
        if seed in out:
            raise ValueError(f"two runs with seed {seed}: a setting's runs must have distinct seeds")
        out[seed] = float(record["organs"][organ][metric])
    return out


@dataclasses.dataclass(frozen=True)
class Direction:
    """Whether raising a swept value from ``low`` to ``high`` moves FP up and FN down, seed by seed."""

    organ: str
    fp: Paired  # FP(high) - FP(low)
    fn: Paired  # FN(high) - FN(low)
    n_both: int  # seeds with FP up and FN down

    def cells(self) -> list[str]:
        n = self.fp.n
        return [f"{self.fp.n_greater}/{n}", format_p(self.fp.p_greater), _interval(self.fp.interval),
                f"{self.fn.n_less}/{n}", format_p(self.fn.p_less), _interval(self.fn.interval), f"{self.n_both}/{n}"]


def direction(low: Sequence[Mapping], high: Sequence[Mapping], organ: str, *, fp_key: str = "fp_ml",
              fn_key: str = "fn_ml", tolerance: float = 0.0) -> Direction:
    """The per-seed comparison of ``high`` against ``low`` (the runs of two swept values) for one organ."""
    fp = paired(by_seed(low, organ, fp_key), by_seed(high, organ, fp_key), tolerance=tolerance)
    fn = paired(by_seed(low, organ, fn_key), by_seed(high, organ, fn_key), tolerance=tolerance)
    both = sum(dfp > tolerance and dfn < -tolerance for dfp, dfn in zip(fp.diffs, fn.diffs))
    return Direction(organ, fp, fn, both)


def format_p(p: float) -> str:
    """A p-value for a table: three decimals, "<0.001" below that, "n/a" for nan."""
    return "n/a" if math.isnan(p) else (f"{p:.3f}" if p >= 0.001 else "<0.001")


def _interval(interval: tuple[float, float]) -> str:
    lo, hi = interval
    if math.isnan(lo):
        return "n/a"
    return f"[{_ml(lo)}, {_ml(hi)}]"


def _ml(value: float) -> str:
    a = abs(value)
    return f"{value:+.1f}" if a >= 10 else (f"{value:+.2f}" if a >= 1 else f"{value:+.3f}")


DIRECTION_HEADER = ("| organ | FP rises (seeds) | p (sign test) | mean FP change, 95% CI (ml) | FN falls (seeds) | "
                    "p (sign test) | mean FN change, 95% CI (ml) | both |")
