"""Hypothesis tests, effect sizes and multiple-comparison correction (scipy / statsmodels underneath).

Conventions:
- the independent unit is the image: callers pass one value per image (averaging repeated
  measures of the same image — timesteps, noise draws — first, or use ``cluster_bootstrap_ci``);
- permutation p-values come from ``scipy.stats.permutation_test``: exact when every permutation
  can be enumerated within ``n_resamples``, else randomized with the (count + 1)/(n + 1) rule, so a
  p-value is never 0 — its floor (the smallest p the test could report) is reported next to it;
- ``alternative``: "two-sided" (default), or one-sided "greater" / "less" (the statistic — after −
  before, a − b — is larger / smaller than under the null); a family that tests one direction counts
  only that direction as significant;
- ``random_set_test``: a component against a sample of null units (random head sets of its size):
  the rank of its mean among theirs, combined with an image-level sign-flip test (see there);
- effect sizes next to every p-value: Cohen's d (pooled SD; d_z for paired data) and Cliff's δ.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

__all__ = [
    "ALTERNATIVES",
    "SetTestResult",
    "TestResult",
    "bootstrap_spearman",
    "paired_spearman_ci",
    "cliffs_delta",
    "cluster_bootstrap_ci",
    "cohens_d",
    "correct_pvalues",
    "independent_p_floor",
    "paired_test",
    "random_set_test",
    "rank_p_value",
    "two_sample_test",
]

ALTERNATIVES = ("two-sided", "greater", "less")


@dataclass(frozen=True, kw_only=True)
class TestResult:
    test: str
    statistic: float  # the observed statistic (difference of means)
    p_value: float
    p_floor: float  # the smallest p-value this test could report (two-sided: twice the one-sided floor)
    effect_size: float
    effect_size_kind: str
    n_a: int
    n_b: int
    n_resamples: int
    alternative: str = "two-sided"

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


def independent_p_floor(n_a: int, n_b: int, n_resamples: int, *, two_sided: bool, swap_ties: bool = False) -> float:
    """The smallest p a label-permutation test of two independent sets can give (scipy's conventions).

    Exact (every one of the C(n_a + n_b, n_a) splits enumerated, when they fit in ``n_resamples``):
    the observed split is counted, and with ``swap_ties`` (a statistic symmetric in a and b, such as a
    distance or |log ratio|) so is its mirror when n_a = n_b; two-sided doubles the one-sided p.
    Randomized: (0 + 1)/(n_resamples + 1), doubled when two-sided.
    """
    splits = math.comb(n_a + n_b, n_a)
    if splits <= n_resamples:
        one = (2 if swap_ties and n_a == n_b else 1) / splits
    else:
        one = 1 / (n_resamples + 1)
    return min(1.0, 2 * one if two_sided else one)


def _check_alternative(alternative: str) -> None:
    if alternative not in ALTERNATIVES:
        raise ValueError(f"alternative must be one of {ALTERNATIVES}, not {alternative!r}")


def _floor(n_null: int, exact: bool, alternative: str) -> float:
    """Smallest attainable p. Exact: 1/N of the N enumerated arrangements (the observed one among them);
    randomized: 1/(R + 1). scipy's two-sided p doubles the smaller one-sided p."""
    one_sided = 1.0 / n_null if exact else 1.0 / (n_null + 1)
    return min(1.0, 2 * one_sided) if alternative == "two-sided" else one_sided


def two_sample_test(a, b, *, alternative: str = "two-sided", n_resamples: int = 9999, seed: int = 0) -> TestResult:
    """Permutation test of a difference in means between independent samples (labels shuffled over units)."""
    _check_alternative(alternative)
    a, b = np.asarray(a, float), np.asarray(b, float)
    res = stats.permutation_test((a, b), _mean_diff, permutation_type="independent", vectorized=True,
                                 n_resamples=n_resamples, alternative=alternative, random_state=np.random.default_rng(seed))
    n_null = len(res.null_distribution)
    exact = math.comb(len(a) + len(b), len(a)) <= n_resamples  # scipy enumerates every relabelling then
    return TestResult(test="permutation (independent)", statistic=float(res.statistic), p_value=float(res.pvalue),
                      p_floor=_floor(n_null, exact, alternative), effect_size=cohens_d(a, b),
                      effect_size_kind="cohens_d", n_a=len(a), n_b=len(b), n_resamples=n_null, alternative=alternative)


def paired_test(after, before, *, alternative: str = "two-sided", n_resamples: int = 9999, seed: int = 0) -> TestResult:
    """Sign-flip permutation test of the mean paired difference (after − before, same inputs);
    ``alternative`` "greater": after − before > 0 on average."""
    _check_alternative(alternative)
    after, before = np.asarray(after, float), np.asarray(before, float)
    diff = after - before
    res = stats.permutation_test((after, before), _mean_diff, permutation_type="samples", vectorized=True,
                                 n_resamples=n_resamples, alternative=alternative, random_state=np.random.default_rng(seed))
    sd = diff.std(ddof=1)
    n_null = len(res.null_distribution)
    exact = 2 ** len(diff) <= n_resamples  # scipy enumerates every sign flip then
    return TestResult(test="permutation (paired sign-flip)", statistic=float(res.statistic), p_value=float(res.pvalue),
                      p_floor=_floor(n_null, exact, alternative),
                      effect_size=float(diff.mean() / sd) if sd > 0 else float("nan"), effect_size_kind="cohens_dz",
                      n_a=len(after), n_b=len(before), n_resamples=n_null, alternative=alternative)


def rank_p_value(observed: float, null) -> float:
    """One-sided Monte-Carlo rank p: (1 + #{null ≥ observed}) / (R + 1) for R null draws.

    Exact (super-uniform) when the observed value and the R draws are exchangeable under the null
    (Barnard; Besag & Clifford): its floor is 1/(R + 1). Ties count against the observed value."""
    null = np.asarray(null, float)
    return float((1 + np.sum(null >= observed)) / (null.size + 1))


@dataclass(frozen=True, kw_only=True)
class SetTestResult:
    """A component's per-unit values against R null members (e.g. random head sets of its size)."""

    degradation: float  # mean over units of the component's values
    null_mean: float  # mean over units and null members
    null_q95: float  # 95th percentile over null members of their unit means: what "beating 95 %" means
    excess: float  # mean over units of (component − mean of the null members)
    ci_low: float  # percentile-bootstrap CI of ``excess`` over units
    ci_high: float
    frac_beaten: float  # fraction of null members whose unit mean the component's exceeds
    frac_beaten_ci_low: float  # percentile-bootstrap CI over units of ``frac_beaten``
    frac_beaten_ci_high: float
    p_sets: float  # rank p of the component's unit mean among the null members' (floor 1/(R + 1))
    p_units: float  # one-sided sign-flip p over units of the excess over the null members' mean
    p_value: float  # max(p_sets, p_units): intersection-union test of both
    p_floor: float  # max of the two floors
    effect_size: float  # Cohen's d_z of the per-unit excess
    n_units: int
    n_null: int

    def to_dict(self) -> dict:
        return asdict(self)


def random_set_test(values, null, *, n_resamples: int = 2000, confidence: float = 0.95, seed: int = 0) -> SetTestResult:
    """Is a component more harmful than the distribution of null members, not just their mean?

    ``values`` ``[n]``: the component's value per unit (image); ``null`` ``[n, R]``: each null member's
    value on the same units. Two one-sided tests, both required (p = the larger: an intersection-union
    test, valid for the union of their nulls without further correction):

    - set-to-set variation: the rank p of the component's mean among the R null members' means, i.e.
      of the mean paired excess over each member (exact when the component is exchangeable with a
      random member; it can reach 1/(R + 1));
    - image-level uncertainty: a sign-flip test over units that the paired excess over the null
      members' mean is positive (the claim holds for images, not only for these images).

    ``frac_beaten`` and its bootstrap CI over units say how much of the null the component beats.
    """
    x, z = np.asarray(values, float), np.asarray(null, float)
    if z.ndim != 2 or z.shape[0] != x.size or z.shape[1] < 1 or x.size < 2:
        raise ValueError("random_set_test needs values [n >= 2] and null [n, R >= 1] on the same units")
    member_means = z.mean(0)  # [R]
    excess = x - z.mean(1)  # [n] paired excess over the null members' mean
    images = paired_test(x, z.mean(1), alternative="greater", n_resamples=n_resamples, seed=seed)
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(x.size, np.full(x.size, 1 / x.size), size=n_resamples) / x.size  # [B, n]
    frac = ((weights @ x)[:, None] > weights @ z).mean(1)  # [B]: fraction beaten on each resample
    _, low, high = _percentile_mean_ci(excess, weights, confidence)
    alpha = 1 - confidence
    p_sets = rank_p_value(x.mean(), member_means)
    sd = excess.std(ddof=1)
    return SetTestResult(
        degradation=float(x.mean()), null_mean=float(z.mean()), null_q95=float(np.quantile(member_means, 0.95)),
        excess=float(excess.mean()), ci_low=low, ci_high=high, frac_beaten=float(np.mean(x.mean() > member_means)),
        frac_beaten_ci_low=float(np.quantile(frac, alpha / 2)), frac_beaten_ci_high=float(np.quantile(frac, 1 - alpha / 2)),
        p_sets=p_sets, p_units=images.p_value, p_value=max(p_sets, images.p_value),
        p_floor=max(1 / (z.shape[1] + 1), images.p_floor), effect_size=float(excess.mean() / sd) if sd > 0 else float("nan"),
        n_units=int(x.size), n_null=int(z.shape[1]))


def _percentile_mean_ci(values: np.ndarray, weights: np.ndarray, confidence: float) -> tuple[float, float, float]:
    """Mean and percentile CI of ``values`` under the resampling ``weights`` ``[B, n]`` (rows sum to 1)."""
    boot = weights @ values
    alpha = 1 - confidence
    return float(values.mean()), float(np.quantile(boot, alpha / 2)), float(np.quantile(boot, 1 - alpha / 2))


def bootstrap_spearman(x, y, *, n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0):
    """Spearman ρ between the column means of ``x`` and ``y`` ``[n_units, k]`` (e.g. images x heads),
    with a percentile-bootstrap CI resampling units (the same rows of both).

    Returns ``(rho, low, high, n_defined)``: resamples where either mean vector is constant have no ρ and
    are dropped (``n_defined`` counts the rest); fewer than 2 units or 3 columns give NaN bounds.
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    if x.shape != y.shape or x.ndim != 2:
        raise ValueError("bootstrap_spearman needs two [n_units, k] arrays of the same shape")
    rho = float(stats.spearmanr(x.mean(0), y.mean(0)).statistic) if x.shape[1] >= 2 else float("nan")
    if x.shape[0] < 2 or x.shape[1] < 3:
        return rho, float("nan"), float("nan"), 0
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(x.shape[0], np.full(x.shape[0], 1 / x.shape[0]), size=n_resamples)  # [B, n]
    boot = _row_spearman(weights @ x, weights @ y)  # column sums ∝ means on each resample: same ranks
    boot = boot[np.isfinite(boot)]
    if boot.size == 0:
        return rho, float("nan"), float("nan"), 0
    alpha = 1 - confidence
    return rho, float(np.quantile(boot, alpha / 2)), float(np.quantile(boot, 1 - alpha / 2)), int(boot.size)


def _row_spearman(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman ρ of each row pair of ``x``, ``y`` ``[B, k]`` (Pearson correlation of their ranks); NaN if constant."""
    rx, ry = stats.rankdata(x, axis=1), stats.rankdata(y, axis=1)
    rx, ry = rx - rx.mean(1, keepdims=True), ry - ry.mean(1, keepdims=True)
    denom = np.sqrt((rx**2).sum(1) * (ry**2).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (rx * ry).sum(1) / denom, np.nan)


def paired_spearman_ci(x, y, *, n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0):
    """Spearman ρ between paired samples ``x``, ``y`` ``[n]`` (e.g. per image: predicted vs measured), with a
    percentile-bootstrap CI resampling the pairs. Returns ``(rho, low, high, n_defined)`` as ``bootstrap_spearman``."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError("paired_spearman_ci needs two 1-D samples of the same length")
    rho = float(stats.spearmanr(x, y).statistic) if x.size >= 2 else float("nan")
    if x.size < 3:
        return rho, float("nan"), float("nan"), 0
    idx = np.random.default_rng(seed).integers(0, x.size, size=(n_resamples, x.size))  # [B, n] resampled pairs
    boot = _row_spearman(x[idx], y[idx])
    boot = boot[np.isfinite(boot)]
    if boot.size == 0:
        return rho, float("nan"), float("nan"), 0
    alpha = 1 - confidence
    return rho, float(np.quantile(boot, alpha / 2)), float(np.quantile(boot, 1 - alpha / 2)), int(boot.size)


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
