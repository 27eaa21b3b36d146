"""Hypothesis tests, effect sizes and multiple-comparison correction (scipy / statsmodels underneath).

Conventions:
- the independent unit is the image: callers pass one value per image (averaging repeated
  measures of the same image — timesteps, noise draws — first, or use ``cluster_bootstrap_ci``);
- permutation p-values follow ``scipy.stats.permutation_test`` on its own draws (``stats.resampling``):
  exact when every permutation can be enumerated within ``n_resamples``, else randomized with the
  (count + 1)/(n + 1) rule, so a p-value is never 0 — its floor (the smallest p the test could
  report) is reported next to it. The null of every column (head, component) comes from one matrix
  of relabellings or sign flips, so testing many columns costs one matrix product (``*_tests``);
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

from diffcircuit.errors import ConfigError
from diffcircuit.stats.resampling import (
    bootstrap_counts,
    percentile_interval,
    permutation_pvalue,
    relabelled_mean_differences,
    sign_flipped_means,
)

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
    "paired_tests",
    "random_set_test",
    "random_set_tests",
    "rank_p_value",
    "two_sample_test",
    "two_sample_tests",
]

ALTERNATIVES = ("two-sided", "greater", "less")


@dataclass(frozen=True, kw_only=True)
class TestResult:
    test: str
    statistic: float  # the observed statistic (difference of means)
    p_value: float
    p_floor: (
        float  # the smallest p-value this test could report (two-sided: twice the one-sided floor)
    )
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
    pooled = np.sqrt(
        ((len(a) - 1) * a.var(ddof=1) + (len(b) - 1) * b.var(ddof=1)) / (len(a) + len(b) - 2)
    )
    return float((a.mean() - b.mean()) / pooled) if pooled > 0 else float("nan")


def cliffs_delta(a, b) -> float:
    """P(a > b) − P(a < b) over all pairs, via the Mann–Whitney U statistic: 2U/(n_a n_b) − 1."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    u = stats.mannwhitneyu(a, b, alternative="two-sided").statistic
    return float(2 * u / (len(a) * len(b)) - 1)


def independent_p_floor(
    n_a: int, n_b: int, n_resamples: int, *, two_sided: bool, swap_ties: bool = False
) -> float:
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
        raise ConfigError(f"alternative must be one of {ALTERNATIVES}, not {alternative!r}")


def _floor(n_null: int, exact: bool, alternative: str) -> float:
    """Smallest attainable p. Exact: 1/N of the N enumerated arrangements (the observed one among them);
    randomized: 1/(R + 1). scipy's two-sided p doubles the smaller one-sided p."""
    one_sided = 1.0 / n_null if exact else 1.0 / (n_null + 1)
    return min(1.0, 2 * one_sided) if alternative == "two-sided" else one_sided


def _columns(x) -> np.ndarray:
    """A sample as ``[n, k]`` columns (a 1-D sample is one column)."""
    x = np.asarray(x, dtype=np.float64)
    return x[:, None] if x.ndim == 1 else x


def _cohens_d_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``cohens_d`` of every column pair of ``a`` ``[n_a, k]`` and ``b`` ``[n_b, k]``."""
    n_a, n_b = len(a), len(b)
    if n_a + n_b < 3:  # no pooled SD of one image per side: d is undefined
        return np.full(a.shape[1:], np.nan)
    pooled = np.sqrt(
        ((n_a - 1) * a.var(0, ddof=1) + (n_b - 1) * b.var(0, ddof=1)) / (n_a + n_b - 2)
    )
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pooled > 0, (a.mean(0) - b.mean(0)) / pooled, np.nan)


def _dz_columns(diff: np.ndarray) -> np.ndarray:
    """Cohen's d_z (mean / SD, ddof 1) of every column of paired differences ``[n, k]``."""
    if len(diff) < 2:  # no SD of one difference: d_z is undefined
        return np.full(diff.shape[1:], np.nan)
    sd = diff.std(0, ddof=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(sd > 0, diff.mean(0) / sd, np.nan)


def _column_results(
    test: str,
    observed,
    p,
    floor: float,
    effect,
    kind: str,
    n: tuple[int, int],
    n_null: int,
    alternative: str,
) -> list[TestResult]:
    """One ``TestResult`` per column of a batched test (``observed``, ``p``, ``effect``: one value per column)."""
    return [
        TestResult(
            test=test,
            statistic=float(observed[j]),
            p_value=float(p[j]),
            p_floor=floor,
            effect_size=float(effect[j]),
            effect_size_kind=kind,
            n_a=n[0],
            n_b=n[1],
            n_resamples=n_null,
            alternative=alternative,
        )
        for j in range(len(observed))
    ]


def two_sample_tests(
    a, b, *, alternative: str = "two-sided", n_resamples: int = 9999, seed: int = 0
) -> list[TestResult]:
    """``two_sample_test`` of every column of ``a`` ``[n_a, k]`` against the same column of ``b`` ``[n_b, k]``,
    all on the same relabellings of the units (one matrix product)."""
    _check_alternative(alternative)
    a, b = _columns(a), _columns(b)
    null, exact = relabelled_mean_differences(a, b, n_resamples, seed)
    null = -null  # mean(a') − mean(b')
    observed = a.mean(0) - b.mean(0)
    p = permutation_pvalue(null, null[0] if exact else observed, alternative, exact)
    floor = _floor(len(null), exact, alternative)
    return _column_results(
        "permutation (independent)", observed, p, floor, _cohens_d_columns(a, b), "cohens_d",
        (len(a), len(b)), len(null), alternative,
    )  # fmt: skip


def two_sample_test(
    a, b, *, alternative: str = "two-sided", n_resamples: int = 9999, seed: int = 0
) -> TestResult:
    """Permutation test of a difference in means between independent samples (labels shuffled over units)."""
    return two_sample_tests(
        np.asarray(a, float)[:, None],
        np.asarray(b, float)[:, None],
        alternative=alternative,
        n_resamples=n_resamples,
        seed=seed,
    )[0]


def paired_tests(
    after, before, *, alternative: str = "two-sided", n_resamples: int = 9999, seed: int = 0
) -> list[TestResult]:
    """``paired_test`` of every column of ``after`` ``[n, k]`` against ``before`` ``[n, k]``, all on the same sign
    flips (one matrix product)."""
    _check_alternative(alternative)
    diff = _columns(after) - _columns(before)
    null, exact = sign_flipped_means(diff, n_resamples, seed)
    observed = diff.mean(0)
    p = permutation_pvalue(null, null[0] if exact else observed, alternative, exact)
    floor = _floor(len(null), exact, alternative)
    return _column_results(
        "permutation (paired sign-flip)", observed, p, floor, _dz_columns(diff), "cohens_dz",
        (len(diff), len(diff)), len(null), alternative,
    )  # fmt: skip


def paired_test(
    after, before, *, alternative: str = "two-sided", n_resamples: int = 9999, seed: int = 0
) -> TestResult:
    """Sign-flip permutation test of the mean paired difference (after − before, same inputs);
    ``alternative`` "greater": after − before > 0 on average."""
    return paired_tests(
        np.asarray(after, float)[:, None],
        np.asarray(before, float)[:, None],
        alternative=alternative,
        n_resamples=n_resamples,
        seed=seed,
    )[0]


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
    null_q95: (
        float  # 95th percentile over null members of their unit means: what "beating 95 %" means
    )
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


def random_set_test(
    values, null, *, n_resamples: int = 2000, confidence: float = 0.95, seed: int = 0
) -> SetTestResult:
    """Is a component more harmful than the distribution of null members, not just their mean?

    ``values`` ``[n]``: the component's value per unit (image); ``null`` ``[n, R]``: each null member's
    value on the same units. Two one-sided tests, both required (p = the larger: an intersection-union
    test, valid for the union of their nulls without further correction):

    - set-to-set variation: the rank p of the component's mean among the R null members' means, i.e.
      of the mean paired excess over each member (exact when the component is exchangeable with a
      random member; it can reach 1/(R + 1));
    - image-level uncertainty: a sign-flip test over units that the paired excess over the null
      members' mean is positive (the claim holds for images, not only for these images).

    ``frac_beaten`` and its percentile interval over ``n_resamples`` bootstrap resamples of the units say
    how much of the null the component beats; ``ci_low``/``ci_high``: the same interval of ``excess``.
    """
    x, z = np.asarray(values, float), np.asarray(null, float)
    if z.ndim != 2 or z.shape[0] != x.size or z.shape[1] < 1 or x.size < 2:
        raise ConfigError(
            "random_set_test needs values [n >= 2] and null [n, R >= 1] on the same units"
        )
    return random_set_tests(
        np.column_stack([x, z]),
        [0],
        [np.arange(1, z.shape[1] + 1)],
        n_resamples=n_resamples,
        confidence=confidence,
        seed=seed,
    )[0]


def random_set_tests(
    units, tested, nulls, *, n_resamples: int = 2000, confidence: float = 0.95, seed: int = 0
) -> list[SetTestResult]:
    """``random_set_test`` of several components on the same units, sharing every draw: ``units`` ``[n, J]``
    holds each component's and null member's values per unit, ``tested`` the components' columns and
    ``nulls`` each one's null members' columns. One sign-flip matrix tests every excess, one matrix of
    bootstrap counts resamples every column."""
    u = np.asarray(units, float)
    n = len(u)
    excess = np.column_stack(
        [u[:, c] - u[:, list(m)].mean(1) for c, m in zip(tested, nulls)]
    )  # [n, C]
    images = paired_tests(
        excess, np.zeros_like(excess), alternative="greater", n_resamples=n_resamples, seed=seed
    )
    (counts,) = bootstrap_counts((n,), n_resamples, seed)
    boot = counts @ u / n  # [B, J]: each column's mean on each resample
    low, high = percentile_interval(counts @ excess / n, confidence)
    means = u.mean(0)  # one reduction for components and members alike: equal columns tie exactly
    return [
        _set_result(
            means[c],
            u[:, list(m)],
            boot[:, c, None] > boot[:, list(m)],
            (low[j], high[j]),
            images[j],
            excess[:, j],
            means[list(m)],
            confidence,
        )
        for j, (c, m) in enumerate(zip(tested, nulls))
    ]


def _set_result(
    x_mean, z, beaten, interval, images: TestResult, excess, member_means, confidence
) -> SetTestResult:
    """One component's ``SetTestResult`` (its mean over units ``x_mean``, reduced as ``member_means`` are);
    ``beaten`` ``[B, R]``: whether it beats each member on each resample."""
    frac_low, frac_high = percentile_interval(beaten.mean(1), confidence)
    p_sets = rank_p_value(x_mean, member_means)
    return SetTestResult(
        degradation=float(x_mean),
        null_mean=float(z.mean()),
        null_q95=float(np.quantile(member_means, 0.95)),
        excess=float(excess.mean()),
        ci_low=float(interval[0]),
        ci_high=float(interval[1]),
        frac_beaten=float(np.mean(x_mean > member_means)),
        frac_beaten_ci_low=float(frac_low),
        frac_beaten_ci_high=float(frac_high),
        p_sets=p_sets,
        p_units=images.p_value,
        p_value=max(p_sets, images.p_value),
        p_floor=max(1 / (z.shape[1] + 1), images.p_floor),
        effect_size=images.effect_size,
        n_units=int(len(excess)),
        n_null=int(z.shape[1]),
    )


def bootstrap_spearman(x, y, *, n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0):
    """Spearman ρ between the column means of ``x`` and ``y`` ``[n_units, k]`` (e.g. images x heads),
    with a percentile-bootstrap CI resampling units (the same rows of both).

    Returns ``(rho, low, high, n_defined)``: resamples where either mean vector is constant have no ρ and
    are dropped (``n_defined`` counts the rest); fewer than 2 units or 3 columns give NaN bounds.
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    if x.shape != y.shape or x.ndim != 2:
        raise ConfigError("bootstrap_spearman needs two [n_units, k] arrays of the same shape")
    rho = (
        float(stats.spearmanr(x.mean(0), y.mean(0)).statistic) if x.shape[1] >= 2 else float("nan")
    )
    if x.shape[0] < 2 or x.shape[1] < 3:
        return rho, float("nan"), float("nan"), 0
    (counts,) = bootstrap_counts((x.shape[0],), n_resamples, seed)  # [B, n]
    boot = _row_spearman(counts @ x, counts @ y)  # column sums ∝ means on each resample: same ranks
    boot = boot[np.isfinite(boot)]
    if boot.size == 0:
        return rho, float("nan"), float("nan"), 0
    alpha = 1 - confidence
    return (
        rho,
        float(np.quantile(boot, alpha / 2)),
        float(np.quantile(boot, 1 - alpha / 2)),
        int(boot.size),
    )


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
        raise ConfigError("paired_spearman_ci needs two 1-D samples of the same length")
    rho = float(stats.spearmanr(x, y).statistic) if x.size >= 2 else float("nan")
    if x.size < 3:
        return rho, float("nan"), float("nan"), 0
    idx = np.random.default_rng(seed).integers(
        0, x.size, size=(n_resamples, x.size)
    )  # [B, n] resampled pairs
    boot = _row_spearman(x[idx], y[idx])
    boot = boot[np.isfinite(boot)]
    if boot.size == 0:
        return rho, float("nan"), float("nan"), 0
    alpha = 1 - confidence
    return (
        rho,
        float(np.quantile(boot, alpha / 2)),
        float(np.quantile(boot, 1 - alpha / 2)),
        int(boot.size),
    )


def correct_pvalues(p_values, method: str = "fdr_bh") -> np.ndarray:
    """Benjamini–Hochberg (``fdr_bh``, default) or ``holm`` adjusted p-values (statsmodels)."""
    from statsmodels.stats.multitest import multipletests

    p = np.asarray(p_values, float)
    if p.size == 0:
        return p
    return multipletests(p, method=method)[1]


def cluster_bootstrap_ci(
    values, clusters, *, confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0
):
    """``(mean, low, high)`` of the mean of ``values``, resampling whole clusters (images), percentile CI.

    Rows of one cluster (e.g. one image at several timesteps) are not independent; resampling the
    clusters keeps them together, so the interval is not artificially narrow.
    """
    values, clusters = np.asarray(values, float), np.asarray(clusters)
    labels, inverse = np.unique(clusters, return_inverse=True)
    sums = np.bincount(inverse, weights=values, minlength=len(labels))
    counts = np.bincount(inverse, minlength=len(labels)).astype(float)
    (weights,) = bootstrap_counts(
        (len(labels),), n_resamples, seed
    )  # [R, clusters]: times each is drawn
    low, high = percentile_interval((weights @ sums) / (weights @ counts), confidence)
    return float(values.mean()), float(low), float(high)
