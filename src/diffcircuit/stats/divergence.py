"""How two image sets differ in a per-image head statistic (attention entropy), head by head.

Inputs: ``a`` [n_a, H] and ``b`` [n_b, H], one row per image (the independent unit), one column
per head, at one timestep.

- **Mean difference** (the headline): Δ_h = mean_b − mean_a per head, in the statistic's units
  (nats for entropy), with a percentile-bootstrap CI resampling images within each set and a
  two-sided label-permutation p (``scipy.stats.permutation_test``: exact when every split of the
  images fits in the resamples, else randomized with (count + 1)/(R + 1)); Benjamini–Hochberg over
  the heads. Averaged over heads — Δ̄ = mean_b(x̄_i) − mean_a(x̄_i) of each image's head mean x̄_i —
  with its own CI and p.
- **Wasserstein-1 divergence** (bin-free): W_h = ∫ |F_a(x) − F_b(x)| dx between the two empirical
  distributions of head h (the ``scipy.stats.wasserstein_distance``; same units as the statistic;
  W_h ≥ |Δ_h|, and it also sees differences in spread and shape). The plug-in W is > 0 for two
  samples of one distribution, so it is reported with its label-permutation null (the same
  permutations for every head): ``excess`` = W − mean(null), the permutation p of W (one-sided:
  larger than the null), and ``null_critical``, the null value that W must exceed for p < α
  (p < α exactly when W > null_critical — what the report's figure draws).
- ``head_jsd``: the legacy Jensen–Shannon divergence of 10-bin histograms with edges from the
  pooled sample's extremes, in bits. It saturates, depends on the bin count and n, and is kept
  only as a documented legacy column.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
from scipy import stats

from diffcircuit.stats.bootstrap import interval_withheld
from diffcircuit.stats.tests import correct_pvalues, independent_p_floor

__all__ = ["MeanDifference", "WassersteinResult", "greater_p", "head_jsd", "mean_difference_test", "null_critical",
           "wasserstein_per_head", "wasserstein_test"]

_BATCH_FLOATS = 2**24  # floats per permutation batch ([batch, heads, images]): 128 MiB


def _batch(n_units: int, n_columns: int) -> int:
    return max(1, _BATCH_FLOATS // max(1, n_units * n_columns))


# --- legacy: JSD of 10-bin histograms ---------------------------------------------------------

def _bin_indices(a: np.ndarray, b: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-head bin index of every value: a [n_a, H], b [n_b, H] -> same shapes, ints in [0, bins)."""
    pooled = np.concatenate([a, b])
    low, high = pooled.min(0), pooled.max(0)
    width = np.where(high > low, (high - low) / bins, 1.0)
    to_bin = lambda x: np.clip(((x - low) / width).astype(np.int64), 0, bins - 1)  # noqa: E731
    return to_bin(a), to_bin(b)


def _histograms(idx: np.ndarray, bins: int) -> np.ndarray:
    """idx [n, H] -> normalised histograms [H, bins]."""
    n, h = idx.shape
    flat = (idx + np.arange(h) * bins).ravel()
    return np.bincount(flat, minlength=h * bins).reshape(h, bins) / n


def head_jsd(a: np.ndarray, b: np.ndarray, *, bins: int = 10) -> np.ndarray:
    """Legacy: per-head JSD (bits) of ``bins``-bin histograms spanning the pooled range of a and b."""
    ia, ib = _bin_indices(np.asarray(a, float), np.asarray(b, float), bins)
    p, q = _histograms(ia, bins), _histograms(ib, bins)
    m = (p + q) / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        kl_p = np.where(p > 0, p * np.log2(p / m), 0.0).sum(-1)
        kl_q = np.where(q > 0, q * np.log2(q / m), 0.0).sum(-1)
    return 0.5 * kl_p + 0.5 * kl_q


# --- permutation p and its critical value -----------------------------------------------------

def _tolerance(observed) -> np.ndarray:
    """scipy's relative tolerance for ties in the null distribution (``permutation_test``)."""
    return np.abs(np.asarray(observed, float) * np.finfo(float).eps * 100)


def greater_p(null: np.ndarray, observed, *, exact: bool) -> np.ndarray:
    """One-sided p of ``observed`` against ``null`` [R, ...], by ``scipy.stats.permutation_test``'s rule:
    #{null ≥ observed}/R when the null enumerates every split (``exact``), else (count + 1)/(R + 1)."""
    count = (null >= observed - _tolerance(observed)).sum(0)
    return (count + (0 if exact else 1)) / (len(null) + (0 if exact else 1))


def null_critical(null: np.ndarray, *, alpha: float, exact: bool) -> np.ndarray:
    """Per column of ``null`` [R, ...]: the value an observed statistic must exceed for ``greater_p`` < α.

    With c = #{null ≥ v}, p < α iff c ≤ m − 1, m the smallest count with p ≥ α; that is, iff v is
    above the m-th largest null value. +inf when no value can reach p < α (too few resamples or splits).
    """
    r = len(null)
    m = math.ceil(alpha * r) if exact else math.ceil(alpha * (r + 1) - 1)
    if m < 1 or (exact and m == 1):  # exact: the observed split is in the null, so c ≥ 1 always
        return np.full(null.shape[1:], np.inf)
    return -np.sort(-null, axis=0)[m - 1]


# --- the mean difference ----------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class MeanDifference:
    """Per column (arrays [H]) or for the mean over columns (0-d arrays): b − a with CI and p."""

    mean_a: np.ndarray
    mean_b: np.ndarray
    difference: np.ndarray  # mean_b − mean_a
    ci_low: np.ndarray  # percentile bootstrap; NaN where withheld
    ci_high: np.ndarray
    ci_withheld: str | None  # why the interval is not given (too few images or resamples), else None
    p_value: np.ndarray  # two-sided label permutation
    q_value: np.ndarray  # Benjamini–Hochberg over the columns (equals p for one column)
    p_floor: float  # the smallest p this test can give at this n and number of permutations
    can_reject: bool  # whether a lone difference can reach q < α: (#columns · p_floor) < α
    n_a: int
    n_b: int
    n_resamples: int  # bootstrap resamples
    n_permutations: int  # permutations drawn (every split when exact)
    exact: bool


def _mean_diff(x, y, axis=-1):
    return np.mean(y, axis=axis) - np.mean(x, axis=axis)


def _bootstrap_diff(a, b, *, confidence, n_resamples, seed):
    with warnings.catch_warnings():  # constant columns give a degenerate (zero-width) interval
        warnings.simplefilter("ignore")
        res = stats.bootstrap((a, b), _mean_diff, axis=0, vectorized=True, paired=False, method="percentile",
                              confidence_level=confidence, n_resamples=n_resamples,
                              batch=_batch(len(a) + len(b), a.shape[1]), random_state=np.random.default_rng(seed))
    diff = _mean_diff(a, b, axis=0)
    low, high = res.confidence_interval.low, res.confidence_interval.high
    constant = (a.std(0) == 0) & (b.std(0) == 0)  # no variation: the interval is the point
    return np.where(constant, diff, low), np.where(constant, diff, high)


def mean_difference_test(a, b, *, confidence: float = 0.95, alpha: float = 0.05, n_resamples: int = 2000,
                         n_permutations: int = 9999, seed: int = 0) -> MeanDifference:
    """Per column of a [n_a, H] and b [n_b, H]: mean b − mean a, bootstrap CI, permutation p, BH q."""
    a, b = np.atleast_2d(np.asarray(a, float).T).T, np.atleast_2d(np.asarray(b, float).T).T  # 1-D -> one column
    n_a, n_b, h = len(a), len(b), a.shape[1]
    withheld = interval_withheld((n_a, n_b), n_resamples)
    if withheld is None:
        low, high = _bootstrap_diff(a, b, confidence=confidence, n_resamples=n_resamples, seed=seed)
    else:
        low = high = np.full(h, np.nan)
    res = stats.permutation_test((a, b), _mean_diff, permutation_type="independent", vectorized=True, axis=0,
                                 n_resamples=n_permutations, alternative="two-sided", batch=_batch(n_a + n_b, h),
                                 random_state=np.random.default_rng(seed + 1))
    exact = math.comb(n_a + n_b, n_a) <= n_permutations
    floor = independent_p_floor(n_a, n_b, n_permutations, two_sided=True)
    p = np.minimum(np.asarray(res.pvalue, float), 1.0)
    return MeanDifference(mean_a=a.mean(0), mean_b=b.mean(0), difference=_mean_diff(a, b, axis=0), ci_low=low,
                          ci_high=high, ci_withheld=withheld, p_value=p, q_value=correct_pvalues(p),
                          p_floor=floor, can_reject=bool(h * floor < alpha), n_a=n_a, n_b=n_b,
                          n_resamples=n_resamples, n_permutations=len(res.null_distribution), exact=exact)


# --- Wasserstein-1 with its permutation null --------------------------------------------------

def wasserstein_per_head(a, b) -> np.ndarray:
    """W1 between the columns of a [n_a, H] and b [n_b, H] -> [H] (``scipy.stats.wasserstein_distance``)."""
    return _Wasserstein(np.asarray(a, float), np.asarray(b, float)).observed()


class _Wasserstein:
    """W1 of every head for any labelling of the pooled images, from each head's sorted pooled values.

    With the pooled values of head h sorted (x_(1) ≤ … ≤ x_(N)), F_a − F_b is constant between
    neighbours: W_h = Σ_k |Σ_{j≤k} w_j| (x_(k+1) − x_(k)), w_j = 1/n_a for an image of a, −1/n_b for b.
    A permutation only changes the labels, so no re-sorting is needed.
    """

    def __init__(self, a: np.ndarray, b: np.ndarray):
        pooled = np.concatenate([a, b])  # [N, H]
        self.n_a, self.n_b = len(a), len(b)
        self.order = np.argsort(pooled, axis=0, kind="stable")  # [N, H]
        self.gaps = np.diff(np.take_along_axis(pooled, self.order, 0), axis=0)  # [N-1, H]

    def of_b(self, b_index: np.ndarray) -> np.ndarray:
        """b_index [..., n_b]: which pooled images are labelled b -> W1 [..., H]."""
        is_b = np.zeros((*b_index.shape[:-1], self.n_a + self.n_b), bool)
        np.put_along_axis(is_b, b_index, True, -1)
        w = np.where(is_b, -1.0 / self.n_b, 1.0 / self.n_a)[..., self.order]  # [..., N, H] in sorted order
        return np.einsum("...nh,nh->...h", np.abs(np.cumsum(w, -2)[..., :-1, :]), self.gaps)

    def observed(self) -> np.ndarray:
        return self.of_b(np.arange(self.n_a, self.n_a + self.n_b))

    def statistic(self, ia, ib, axis=-1):
        """For ``permutation_test``: index samples [..., H, n] (every head row the same labelling)."""
        return self.of_b(np.moveaxis(ib, axis, -1)[..., 0, :])


@dataclass(frozen=True, kw_only=True)
class WassersteinResult:
    """Per head (arrays [H]) and their mean over heads (floats), with the permutation null."""

    per_head: np.ndarray  # plug-in W1 per head
    per_head_null_mean: np.ndarray
    per_head_p: np.ndarray
    per_head_q: np.ndarray  # BH over heads
    value: float  # mean over heads of W1
    null_mean: float  # mean of its permutation null
    excess: float  # value − null_mean: the null-corrected divergence
    null_critical: float  # p_value < α exactly when value > null_critical
    p_value: float
    p_floor: float
    can_reject: bool  # for the mean over heads: p_floor < α
    heads_can_reject: bool  # for a lone head after BH: H · p_floor < α
    n_permutations: int
    exact: bool


def wasserstein_test(a, b, *, alpha: float = 0.05, n_permutations: int = 1999, seed: int = 0) -> WassersteinResult:
    """W1 per head and its mean over heads against the label-permutation null (same permutations for all heads)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    (n_a, h), n_b = a.shape, len(b)
    w = _Wasserstein(a, b)
    index_a = np.repeat(np.arange(n_a)[:, None], h, 1)  # [n_a, H]: every head carries the same labels
    index_b = np.repeat(np.arange(n_a, n_a + n_b)[:, None], h, 1)
    res = stats.permutation_test((index_a, index_b), w.statistic, permutation_type="independent", vectorized=True,
                                 axis=0, n_resamples=n_permutations, alternative="greater",
                                 batch=_batch(n_a + n_b, h), random_state=np.random.default_rng(seed))
    exact = math.comb(n_a + n_b, n_a) <= n_permutations
    null = np.asarray(res.null_distribution)  # [R, H]
    observed, null_mean = np.asarray(res.statistic), null.mean(1)  # the mean over heads, per permutation
    value = float(observed.mean())
    floor = independent_p_floor(n_a, n_b, n_permutations, two_sided=False, swap_ties=True)
    p_heads = np.minimum(np.asarray(res.pvalue, float), 1.0)
    return WassersteinResult(
        per_head=observed, per_head_null_mean=null.mean(0), per_head_p=p_heads, per_head_q=correct_pvalues(p_heads),
        value=value, null_mean=float(null_mean.mean()), excess=value - float(null_mean.mean()),
        null_critical=float(null_critical(null_mean, alpha=alpha, exact=exact)),
        p_value=float(greater_p(null_mean, value, exact=exact)), p_floor=floor, can_reject=bool(floor < alpha),
        heads_can_reject=bool(h * floor < alpha), n_permutations=len(null), exact=exact)

