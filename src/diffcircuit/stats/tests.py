"""Hypothesis tests, effect sizes and multiple-comparison correction (scipy / statsmodels underneath).

Conventions:
- the independent unit is the image: callers pass one value per image (averaging repeated
  measures of the same image — timesteps, noise draws — first, or use ``cluster_bootstrap_ci``);
- permutation p-values come from ``scipy.stats.permutation_test``: exact when every permutation
  can be enumerated within ``n_resamples``, else randomized with the (count + 1)/(n + 1) rule, so a
  p-value is never 0 — its floor 1/(n + 1) is reported next to it;
- effect sizes next to every p-value: Cohen's d (pooled SD; d_z for paired data) and Cliff's δ.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

__all__ = [
    "TestResult",
    "cliffs_delta",
    "cluster_bootstrap_ci",
    "cohens_d",
    "correct_pvalues",
    "paired_test",
    "two_sample_test",
]


@dataclass(frozen=True, kw_only=True)
class TestResult:
    test: str
    statistic: float  # the observed statistic (difference of means)
    p_value: float
    p_floor: float  # the smallest p-value this test could report: 2/(n_resamples + 1), or 0 if exact
    effect_size: float
    effect_size_kind: str
    n_a: int
    n_b: int
    n_resamples: int

    def to_dict(self) -> dict:
        return asdict(self)


def cohens_d(a, b) -> float:
    """(mean a − mean b) / pooled SD (ddof = 1)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    pooled = np.sqrt(((len(a) - 1) * a.var(ddof=1) + (len(b) - 1) * b.var(ddof=1)) / (len(a) + len(b) - 2))
    return float((a.mean() - b.mean()) / pooled) if pooled > 0 else float("nan")


def cliffs_delta(a, b) -> float:
    """P(a > b) − P(a < b) over all pairs, via the Mann–Whitney U statistic: 2U/(n_a n_b) − 1."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    u = stats.mannwhitneyu(a, b, alternative="two-sided").statistic
    return float(2 * u / (len(a) * len(b)) - 1)


def _mean_diff(x, y, axis=-1):
    return np.mean(x, axis=axis) - np.mean(y, axis=axis)


def _floor(n_resamples: int, exact: bool) -> float:
    """Smallest two-sided p: scipy doubles the smaller one-sided (count + 1)/(n + 1)."""
    return 0.0 if exact else 2.0 / (n_resamples + 1)


def two_sample_test(a, b, *, n_resamples: int = 9999, seed: int = 0) -> TestResult:
    """Permutation test of a difference in means between independent samples (labels shuffled over units)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    res = stats.permutation_test((a, b), _mean_diff, permutation_type="independent", vectorized=True,
                                 n_resamples=n_resamples, alternative="two-sided", random_state=np.random.default_rng(seed))
    exact = len(res.null_distribution) < n_resamples
    return TestResult(test="permutation (independent)", statistic=float(res.statistic), p_value=float(res.pvalue),
                      p_floor=_floor(n_resamples, exact), effect_size=cohens_d(a, b), effect_size_kind="cohens_d",
                      n_a=len(a), n_b=len(b), n_resamples=len(res.null_distribution))


def paired_test(after, before, *, n_resamples: int = 9999, seed: int = 0) -> TestResult:
    """Sign-flip permutation test of the mean paired difference (after − before, same inputs)."""
    after, before = np.asarray(after, float), np.asarray(before, float)
    diff = after - before
    res = stats.permutation_test((after, before), _mean_diff, permutation_type="samples", vectorized=True,
                                 n_resamples=n_resamples, alternative="two-sided", random_state=np.random.default_rng(seed))
    sd = diff.std(ddof=1)
    exact = len(res.null_distribution) < n_resamples
    return TestResult(test="permutation (paired sign-flip)", statistic=float(res.statistic), p_value=float(res.pvalue),
                      p_floor=_floor(n_resamples, exact), effect_size=float(diff.mean() / sd) if sd > 0 else float("nan"),
                      effect_size_kind="cohens_dz", n_a=len(after), n_b=len(before),
                      n_resamples=len(res.null_distribution))


def correct_pvalues(p_values, method: str = "fdr_bh") -> np.ndarray:
    """Benjamini–Hochberg (``fdr_bh``, default) or ``holm`` adjusted p-values (statsmodels)."""
    from statsmodels.stats.multitest import multipletests

    p = np.asarray(p_values, float)
    if p.size == 0:
        return p
    return multipletests(p, method=method)[1]


def cluster_bootstrap_ci(values, clusters, *, confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0):
    """``(mean, low, high)`` of the mean of ``values``, resampling whole clusters (images), percentile CI.

    Rows of one cluster (e.g. one image at several timesteps) are not independent; resampling the
    clusters keeps them together, so the interval is not artificially narrow.
    """
    values, clusters = np.asarray(values, float), np.asarray(clusters)
    labels, inverse = np.unique(clusters, return_inverse=True)
    sums = np.bincount(inverse, weights=values, minlength=len(labels))
    counts = np.bincount(inverse, minlength=len(labels)).astype(float)
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(len(labels), np.full(len(labels), 1 / len(labels)), size=n_resamples)  # [R, clusters]
    boot = (weights @ sums) / (weights @ counts)
    alpha = 1 - confidence
    low, high = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    return float(values.mean()), float(low), float(high)
