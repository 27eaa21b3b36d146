"""Circuit-complexity measures and the natural/synthetic ratio test.

Measures of a set of images (rows) x heads (columns) of per-image head values:

- ``participation_ratio``: (Σ_h e_h)² / Σ_h e_h² of the heads' mean positive ablation effects e_h
  — the effective number of heads that matter (1 if one head carries everything, H if all equally);
- ``heads_for_fraction``: how many heads, taken in order of effect, account for 90 % of Σ_h e_h
  (an additive approximation of "heads needed to keep 90 % of performance");
- ``mean_value``: the mean over rows and columns (for attention statistics such as normalised
  entropy or effective-keys fraction).

Each depends on the rows only through the columns' sums and finite counts (``ColumnMeasure``), so its
value on every resample or relabelling comes from two matrix products (counts @ rows).

``ratio_test`` compares a measure between two image sets, r = measure(b) / measure(a):

- p: label permutation over images (``scipy.stats.permutation_test``'s draws and rule,
  ``stats.resampling``), two-sided on |log r| — exact when every split of the images fits in the
  permutations, else (count + 1)/(R + 1). Its null is that the two sets' images are exchangeable (equal
  distributions), not that the measure is equal: a plug-in measure depends on the per-image noise too (the
  participation ratio rises with it — noise adds to Σ e_h² and the clipping at 0 turns heads without
  effect positive), so a difference in noise alone can reject. ``noise_a``/``noise_b`` report it: the mean
  over heads of the standard error of a head's mean (s_h/√n);
  ``p_floor`` is the smallest p this n and R allow (two sets of 2 images: 6 splits, the observed
  one and its mirror tie, so p ≥ 1/3) and ``can_reject`` whether it is below α;
- CI: the percentile interval of bootstrap resamples of the images within each set; withheld (``ci_withheld`` says why)
  with fewer than 5 images in a set, fewer than 200 resamples, a ratio undefined in a resample, or
  an interval that excludes its own estimate (``stats.bootstrap``);
- ``se_log_ratio``: the bootstrap standard deviation of log r, and ``mde_ratio`` = exp((z₀.₉₇₅ +
  z₀.₈)·se) = exp(2.80·se): the smallest ratio (above 1; its inverse below) that a two-sided α = 0.05
  test with this standard error detects with 80 % power (normal approximation on the log scale,
  the far tail's < 1e-5 neglected).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

from diffcircuit.stats.bootstrap import contains_estimate, interval_withheld
from diffcircuit.stats.resampling import (
    bootstrap_counts,
    percentile_interval,
    permutation_pvalue,
    relabellings,
)
from diffcircuit.stats.tests import independent_p_floor

__all__ = [
    "ColumnMeasure",
    "RatioResult",
    "heads_for_fraction",
    "mean_value",
    "minimal_detectable_ratio",
    "participation_ratio",
    "ratio_test",
]


@dataclass(frozen=True)
class ColumnMeasure:
    """A measure of a set of rows that depends on them only through each column's sum and count of finite
    values (NaNs ignored): ``of_sums(sums [..., H], counts [..., H]) -> [...]``, so that it can be evaluated on
    every resample or relabelling at once from matrix products. Called on ``rows`` ``[n, H]`` it gives a float."""

    name: str
    of_sums: Callable[[np.ndarray, np.ndarray], np.ndarray]

    def __call__(self, rows) -> float:
        rows = np.asarray(rows, dtype=np.float64)
        finite = np.isfinite(rows)
        return float(
            self.of_sums(np.where(finite, rows, 0.0).sum(0), finite.sum(0).astype(np.float64))
        )


def _effects(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The heads' mean effects, clipped at 0 (NaN for a column without finite values)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.clip(sums / counts, 0, None)


def _participation(sums, counts):
    e = _effects(sums, counts)
    total = e.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, total**2 / (e**2).sum(-1), np.nan)


def _heads_for_90pct(sums, counts, fraction: float = 0.9):
    e = -np.sort(-_effects(sums, counts), axis=-1)  # largest first
    total = e.sum(-1)
    needed = (np.cumsum(e, axis=-1) < (fraction * total - 1e-12 * total)[..., None]).sum(-1) + 1.0
    return np.where(total > 0, needed, np.nan)


def _overall_mean(sums, counts):
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums.sum(-1) / counts.sum(-1)


participation_ratio = ColumnMeasure("participation_ratio", _participation)
heads_for_fraction = ColumnMeasure("heads_for_fraction", _heads_for_90pct)  # the fraction is 0.9
mean_value = ColumnMeasure("mean_value", _overall_mean)


def minimal_detectable_ratio(
    se_log_ratio: float, *, alpha: float = 0.05, power: float = 0.8
) -> float:
    """exp((z_{1−α/2} + z_power) · se): the ratio a two-sided level-α test of log r = 0 with standard
    error ``se_log_ratio`` detects with probability ``power`` (normal approximation)."""
    z = stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)
    return float(np.exp(z * se_log_ratio))


@dataclass(frozen=True, kw_only=True)
class RatioResult:
    value_a: float
    value_b: float
    value: float  # value_b / value_a
    ci_low: float  # NaN where withheld
    ci_high: float
    ci_withheld: str | None  # why there is no interval, else None
    noise_a: float  # mean over columns of the standard error of the column's mean (s/√n), set a
    noise_b: float
    se_log_ratio: float  # bootstrap SD of log(ratio); NaN where the bootstrap was not run
    mde_ratio: float  # smallest ratio > 1 detectable with 80 % power at α = 0.05 given se_log_ratio
    p_value: float
    p_floor: float  # the smallest p this test can give at this n and number of permutations
    can_reject: bool  # p_floor < α
    n_permutations: int  # drawn (every split when exact)
    exact: bool
    n_resamples: int  # bootstrap resamples
    n_a: int
    n_b: int

    def to_dict(self) -> dict:
        return asdict(self)


def _noise(rows: np.ndarray) -> float:
    """Mean over columns of the standard error of each column's mean (NaN ignored; NaN below 2 values)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return (
            float(np.nanmean(stats.sem(rows, axis=0, nan_policy="omit")))
            if len(rows) > 1
            else float("nan")
        )


def _weighted(measure: ColumnMeasure, weights: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``measure`` of ``rows`` ``[n, H]`` with unit i counted ``weights[r, i]`` times, for every row r of the weights:
    column sums ``weights @ rows`` (NaN as 0) and finite counts ``weights @ mask`` (row sums when all finite)."""
    finite = np.isfinite(rows)
    if finite.all():
        return measure.of_sums(
            weights @ rows, np.broadcast_to(weights.sum(1)[:, None], (len(weights), rows.shape[1]))
        )
    return measure.of_sums(
        weights @ np.where(finite, rows, 0.0), weights @ finite.astype(np.float64)
    )


def _log_ratios(measure: ColumnMeasure, weights_a, rows_a, weights_b, rows_b) -> np.ndarray:
    """log measure(b) / measure(a) for each row of the weights (counts of each unit, ``[R, n]``); NaN where
    undefined (a measure ≤ 0 or NaN on either side)."""
    va, vb = _weighted(measure, weights_a, rows_a), _weighted(measure, weights_b, rows_b)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((va > 0) & (vb > 0), np.log(vb / va), np.nan)


def _bootstrap(
    a, b, measure, ratio, n_boot, confidence, seed
) -> tuple[float, float, float, str | None]:
    """Percentile interval of the ratio over ``n_boot`` resamples of the images within each set (bootstrap
    counts, a's drawn first), and the SD of log ratio."""
    counts_a, counts_b = bootstrap_counts((len(a), len(b)), n_boot, seed)
    boot = _log_ratios(measure, counts_a, a, counts_b, b)
    if not np.isfinite(boot).all():
        return (
            np.nan,
            np.nan,
            np.nan,
            f"ratio undefined in {int((~np.isfinite(boot)).sum())} of {n_boot} resamples",
        )
    low, high = np.exp(percentile_interval(boot, confidence))
    se = float(boot.std(ddof=1))
    if not contains_estimate(ratio, low, high):
        return (
            np.nan,
            np.nan,
            se,
            "bootstrap interval excludes the estimate (statistic biased at this n)",
        )
    return float(low), float(high), se, None


def _permutation(a, b, measure, n_perm, seed) -> tuple[float, int]:
    """Two-sided p on |log ratio| with the labels shuffled over the pooled images; the null's size.

    A relabelling on which the ratio is undefined (a measure ≤ 0 or NaN on one side) counts as at least as
    extreme as the observed ratio (+inf): conservative, where NaN would silently count as less extreme."""
    is_a, exact = relabellings(len(a), len(b), n_perm, seed)
    pooled = np.concatenate([a, b])
    extreme = np.abs(
        _log_ratios(measure, is_a.astype(np.float64), pooled, (~is_a).astype(np.float64), pooled)
    )
    observed = np.abs(_log_ratios(measure, np.ones((1, len(a))), a, np.ones((1, len(b))), b))[0]
    return float(
        permutation_pvalue(np.where(np.isnan(extreme), np.inf, extreme), observed, "greater", exact)
    ), len(is_a)


def ratio_test(
    a: np.ndarray,
    b: np.ndarray,
    measure: ColumnMeasure,
    *,
    n_boot: int = 1000,
    n_perm: int = 1000,
    confidence: float = 0.95,
    alpha: float = 0.05,
    seed: int = 0,
) -> RatioResult:
    """measure(b) / measure(a) with a bootstrap CI over images (percentile interval of ``n_boot`` resamples,
    draws of ``seed``), a label-permutation p (``n_perm`` relabellings, draws of ``seed + 1``) and its power."""
    if not isinstance(measure, ColumnMeasure):
        raise TypeError(
            "ratio_test needs a ColumnMeasure (a measure of the columns' sums and counts), "
            f"not {type(measure).__name__}"
        )
    a, b = np.asarray(a, float), np.asarray(b, float)
    va, vb = measure(a), measure(b)
    ratio = vb / va if va > 0 and vb > 0 else float("nan")
    withheld = interval_withheld((len(a), len(b)), n_boot)
    low = high = se = float("nan")
    if withheld is None and np.isfinite(ratio):
        low, high, se, withheld = _bootstrap(a, b, measure, ratio, n_boot, confidence, seed)
    p, drawn = (
        _permutation(a, b, measure, n_perm, seed + 1) if np.isfinite(ratio) else (float("nan"), 0)
    )
    floor = independent_p_floor(len(a), len(b), n_perm, two_sided=False, swap_ties=True)
    return RatioResult(
        value_a=va,
        value_b=vb,
        value=float(ratio),
        ci_low=low,
        ci_high=high,
        ci_withheld=withheld if np.isfinite(ratio) else "ratio undefined",
        noise_a=_noise(a),
        noise_b=_noise(b),
        se_log_ratio=se,
        mde_ratio=minimal_detectable_ratio(se, alpha=alpha) if np.isfinite(se) else float("nan"),
        p_value=p,
        p_floor=floor,
        can_reject=bool(floor < alpha),
        n_permutations=drawn,
        exact=math.comb(len(a) + len(b), len(a)) <= n_perm,
        n_resamples=n_boot,
        n_a=len(a),
        n_b=len(b),
    )
