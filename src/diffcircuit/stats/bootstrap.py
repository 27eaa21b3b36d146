"""Percentile bootstrap confidence intervals over independent units (images).

Resampled means come from bootstrap counts (``stats.resampling``): one matrix product for every
resample and column, on scipy's draws for the seed (``scipy.stats.bootstrap`` with that seed and no
batching gives the same resamples).

When an interval is given at all: a percentile interval is withheld (``interval_withheld`` says why)
when a set has fewer than ``MIN_UNITS_FOR_CI`` units — a bootstrap of 2 images has 3 distinct
resamples and covers far less than its nominal 95 % — or when fewer than ``MIN_RESAMPLES_FOR_CI``
resamples were drawn, and (``contains_estimate``) when the interval excludes its own estimate: the
statistic is then biased at this n by more than its spread, and the interval is not a CI for it.
"""

from __future__ import annotations

import warnings

import numpy as np

from diffcircuit.errors import ConfigError
from diffcircuit.stats.resampling import bootstrap_counts, percentile_interval, resampled_means

__all__ = [
    "MIN_RESAMPLES_FOR_CI",
    "MIN_UNITS_FOR_CI",
    "column_mean_cis",
    "contains_estimate",
    "interval_withheld",
    "mean_ci",
]

MIN_UNITS_FOR_CI = 5  # per set; at n = 5 a percentile interval of a mean already covers only ≈ 85 %
MIN_RESAMPLES_FOR_CI = 200  # below this, 2.5 % / 97.5 % quantiles rest on a handful of resamples


def interval_withheld(n_units, n_resamples: int) -> str | None:
    """Why a bootstrap interval over sets of ``n_units`` (one count per set) is not given, or None."""
    few = min(int(n) for n in n_units)
    if few < MIN_UNITS_FOR_CI:
        return f"{few} images in a set (< {MIN_UNITS_FOR_CI})"
    if n_resamples < MIN_RESAMPLES_FOR_CI:
        return f"{n_resamples} bootstrap resamples (< {MIN_RESAMPLES_FOR_CI})"
    return None


def contains_estimate(estimate, low, high) -> np.ndarray:
    """Whether each interval [low, high] contains its estimate (with a relative tolerance of 1e-9)."""
    est, low, high = (np.asarray(x, float) for x in (estimate, low, high))
    tol = 1e-9 * np.maximum(1.0, np.abs(est))
    return (low <= est + tol) & (est - tol <= high)


def mean_ci(
    values, *, confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """``(mean, low, high)``: the mean of ``values`` (one per image) with the percentile interval of its
    ``n_resamples`` bootstrap resamples (``stats.resampling``: scipy's draws for ``seed``).

    Percentile rather than BCa: BCa's jackknife costs n extra evaluations and fails on constant
    samples; with one value per image the percentile interval is the documented default here.
    A single value, or identical values, give a zero-width interval.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ConfigError("mean_ci needs a non-empty 1-D sample")
    mean = float(x.mean())
    if x.size == 1 or np.all(x == x[0]):
        return mean, mean, mean
    (counts,) = bootstrap_counts((x.size,), n_resamples, seed)
    low, high = percentile_interval(counts @ x / x.size, confidence)
    return mean, float(low), float(high)


def column_mean_cis(values, *, confidence: float = 0.95, n_resamples: int = 1000, seed: int = 0):
    """Per-column ``(mean, low, high)`` of ``values`` ``[n_units, k]``: percentile interval of ``n_resamples``
    bootstrap resamples of the rows (units), all columns on the same resamples (one matrix product).

    NaNs are ignored (``nanmean``, on each resample too). Columns with fewer than two finite values, or
    no spread, get a zero-width interval.
    """
    x = np.asarray(values, dtype=np.float64)
    with (
        warnings.catch_warnings()
    ):  # all-NaN columns (e.g. object probes without masks) are expected
        warnings.simplefilter("ignore", RuntimeWarning)
        mean, spread = np.nanmean(x, axis=0), np.nanstd(x, axis=0)
    low, high = mean.copy(), mean.copy()
    varied = (np.isfinite(x).sum(0) >= 2) & (spread > 0)
    if varied.any():
        (counts,) = bootstrap_counts((x.shape[0],), n_resamples, seed)
        low[varied], high[varied] = percentile_interval(
            resampled_means(counts, x[:, varied]), confidence
        )
    return mean, low, high
