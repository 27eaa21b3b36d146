"""Bootstrap confidence intervals over independent units (images), via ``scipy.stats.bootstrap``."""

from __future__ import annotations

import numpy as np
from scipy import stats

__all__ = ["mean_ci"]


def mean_ci(values, *, confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """``(mean, low, high)``: the mean of ``values`` (one per image) with a percentile bootstrap CI.

    Percentile rather than BCa: BCa's jackknife costs n extra evaluations and fails on constant
    samples; with one value per image the percentile interval is the documented default here.
    A single value, or identical values, give a zero-width interval.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError("mean_ci needs a non-empty 1-D sample")
    mean = float(x.mean())
    if x.size == 1 or np.all(x == x[0]):
        return mean, mean, mean
    res = stats.bootstrap((x,), np.mean, confidence_level=confidence, n_resamples=n_resamples,
                          method="percentile", random_state=np.random.default_rng(seed), vectorized=True)
    return mean, float(res.confidence_interval.low), float(res.confidence_interval.high)
