"""Circuit-complexity measures and the natural/synthetic ratio test.

Measures of a set of images (rows) x heads (columns) of per-image head values:

- ``participation_ratio``: (Σ_h e_h)² / Σ_h e_h² of the heads' mean positive ablation effects e_h
  — the effective number of heads that matter (1 if one head carries everything, H if all equally);
- ``heads_for_fraction``: how many heads, taken in order of effect, account for 90 % of Σ_h e_h
  (an additive approximation of "heads needed to keep 90 % of performance");
- ``mean_value``: the mean over rows and columns (for attention statistics such as normalised
  entropy or effective-keys fraction).

``ratio_test`` compares a measure between two image sets, r = measure(b) / measure(a):

- p: label permutation over images (``scipy.stats.permutation_test``), two-sided on |log r| —
  exact when every split of the images fits in the permutations, else (count + 1)/(R + 1);
  ``p_floor`` is the smallest p this n and R allow (two sets of 2 images: 6 splits, the observed
  one and its mirror tie, so p ≥ 1/3) and ``can_reject`` whether it is below α;
- CI: percentile bootstrap resampling images within each set; withheld (``ci_withheld`` says why)
  with fewer than 5 images in a set, fewer than 200 resamples, a ratio undefined in a resample, or
  an interval that excludes its own estimate (``stats.bootstrap``);
- ``se_log_ratio``: the bootstrap standard deviation of log r, and ``mde_ratio`` = exp((z₀.₉₇₅ +
  z₀.₈)·se) = exp(2.80·se): the smallest ratio (above 1; its inverse below) that a two-sided α = 0.05
  test with this standard error detects with 80 % power (normal approximation on the log scale,
  the far tail's < 1e-5 neglected).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

from diffcircuit.stats.bootstrap import contains_estimate, interval_withheld
from diffcircuit.stats.tests import independent_p_floor

__all__ = ["RatioResult", "heads_for_fraction", "mean_value", "minimal_detectable_ratio", "participation_ratio",
           "ratio_test"]


def _effects(rows: np.ndarray) -> np.ndarray:
    return np.clip(np.nanmean(rows, axis=0), 0, None)


def participation_ratio(rows: np.ndarray) -> float:
    e = _effects(rows)
    total = e.sum()
    return float(total**2 / (e**2).sum()) if total > 0 else float("nan")


def heads_for_fraction(rows: np.ndarray, fraction: float = 0.9) -> float:
    e = np.sort(_effects(rows))[::-1]
    total = e.sum()
    if total <= 0:
        return float("nan")
    return float(np.searchsorted(np.cumsum(e), fraction * total - 1e-12 * total) + 1)


def mean_value(rows: np.ndarray) -> float:
    return float(np.nanmean(rows))


def minimal_detectable_ratio(se_log_ratio: float, *, alpha: float = 0.05, power: float = 0.8) -> float:
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


def _log_ratio(measure, a, b):
    """statistic(ia, ib): log measure(b[ib]) / measure(a[ia]) (NaN where undefined)."""
    def stat(ia, ib):
        with np.errstate(divide="ignore", invalid="ignore"):
            va, vb = measure(a[ia]), measure(b[ib])
            return float(np.log(vb / va)) if va > 0 and vb > 0 else float("nan")
    return stat


def _permutation(a, b, measure, n_perm, rng) -> tuple[float, int]:
    """Two-sided p on |log ratio| with the labels shuffled over the pooled images; the null's size.

    A relabelling on which the ratio is undefined (a measure ≤ 0 or NaN on one side) counts as at least as
    extreme as the observed ratio (+inf): conservative, where NaN would silently count as less extreme."""
    pooled = np.concatenate([a, b])
    log_ratio = _log_ratio(measure, pooled, pooled)

    def extremeness(ia, ib):
        value = abs(log_ratio(ia, ib))
        return value if value == value else math.inf

    res = stats.permutation_test((np.arange(len(a)), np.arange(len(a), len(pooled))),
                                 extremeness, permutation_type="independent",
                                 vectorized=False, n_resamples=n_perm, alternative="greater", random_state=rng)
    return float(res.pvalue), len(res.null_distribution)


def _bootstrap(a, b, measure, ratio, n_boot, confidence, rng) -> tuple[float, float, float, str | None]:
    """Percentile interval of the ratio and the SD of log ratio, from resampling images within each set."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = stats.bootstrap((np.arange(len(a)), np.arange(len(b))), _log_ratio(measure, a, b), paired=False,
                              vectorized=False, n_resamples=n_boot, method="percentile", confidence_level=confidence,
                              random_state=rng)
    boot = np.asarray(res.bootstrap_distribution)
    if not np.isfinite(boot).all():
        return np.nan, np.nan, np.nan, f"ratio undefined in {int((~np.isfinite(boot)).sum())} of {n_boot} resamples"
    low, high = float(np.exp(res.confidence_interval.low)), float(np.exp(res.confidence_interval.high))
    se = float(boot.std(ddof=1))
    if not contains_estimate(ratio, low, high):
        return np.nan, np.nan, se, "bootstrap interval excludes the estimate (statistic biased at this n)"
    return low, high, se, None


def ratio_test(a: np.ndarray, b: np.ndarray, measure: Callable[[np.ndarray], float], *, n_boot: int = 1000,
               n_perm: int = 1000, confidence: float = 0.95, alpha: float = 0.05, seed: int = 0) -> RatioResult:
    """measure(b) / measure(a) with a bootstrap CI over images, a label-permutation p and its power."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    rng = np.random.default_rng(seed)
    va, vb = measure(a), measure(b)
    ratio = vb / va if va > 0 and vb > 0 else float("nan")
    withheld = interval_withheld((len(a), len(b)), n_boot)
    low = high = se = float("nan")
    if withheld is None and np.isfinite(ratio):
        low, high, se, withheld = _bootstrap(a, b, measure, ratio, n_boot, confidence, rng)
    p, drawn = _permutation(a, b, measure, n_perm, rng) if np.isfinite(ratio) else (float("nan"), 0)
    floor = independent_p_floor(len(a), len(b), n_perm, two_sided=False, swap_ties=True)
    return RatioResult(value_a=va, value_b=vb, value=float(ratio), ci_low=low, ci_high=high,
                       ci_withheld=withheld if np.isfinite(ratio) else "ratio undefined", se_log_ratio=se,
                       mde_ratio=minimal_detectable_ratio(se, alpha=alpha) if np.isfinite(se) else float("nan"),
                       p_value=p, p_floor=floor, can_reject=bool(floor < alpha), n_permutations=drawn,
                       exact=math.comb(len(a) + len(b), len(a)) <= n_perm, n_resamples=n_boot, n_a=len(a), n_b=len(b))
