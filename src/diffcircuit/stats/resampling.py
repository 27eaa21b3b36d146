"""The random draws behind every bootstrap and permutation test, and how they become statistics.

Draws are scipy's own (``scipy.stats.bootstrap`` / ``permutation_test`` with a fresh
``np.random.default_rng(seed)`` and no batching), so a statistic computed here from the draws of
``seed`` is the one scipy computes with that seed; they are a pure function of their arguments and
memoised (read-only arrays), so the many tests of one run that share a seed and a size share them.

- **Bootstrap counts** ``K`` ``[R, n]``: K[r, i] = how often unit i is drawn in resample r (n draws
  with replacement, ``rng.integers(0, n, (R, n))``). A resampled mean of every column of ``x``
  ``[n, k]`` at once is ``K @ x / n`` — one matrix product for all resamples and columns; with NaNs,
  ``K @ x₀ / K @ m`` (x₀: x with NaN set to 0, m: its finite mask), as ``nanmean`` of each resample.
- **Relabellings** ``[R, n_a + n_b]`` (bool, True = the first sample) for a two-sample label
  permutation: every split when C(n_a + n_b, n_a) ≤ R (exact; the first is the observed split), else
  R ``rng.permutation`` draws; a null of mean differences is one matrix product ``is_a @ x``.
- **Sign flips** ``[R, n]`` (±1) for a paired test (each pair swapped or not): every pattern when
  2ⁿ ≤ R (exact; the first swaps nothing), else R draws; the null of mean differences is ``signs @ d / n``.
  When exact, the observed statistic is taken from the first row, so that it ties with itself bit for bit.
- ``permutation_pvalue``: scipy's rule — #{null ≥ observed}/R when exact (the observed arrangement is
  among the R), else (count + 1)/(R + 1); two-sided: twice the smaller one-sided p, at most 1; ties
  within a relative 100·eps of the observed value count as ≥.
- ``percentile_interval``: the α/2 and 1 − α/2 quantiles of the resamples (``scipy.stats.quantile``,
  as ``scipy.stats.bootstrap`` takes them).
"""

from __future__ import annotations

import math
from functools import lru_cache
from itertools import combinations, product

import numpy as np
from scipy import stats

__all__ = [
    "bootstrap_counts",
    "percentile_interval",
    "permutation_pvalue",
    "relabelled_mean_differences",
    "relabelled_welch_t",
    "relabellings",
    "resampled_means",
    "sign_flipped_means",
    "sign_flips",
]

_CHUNK = 1024  # permutations per block when a null is built by matrix products
_EPS = float(np.finfo(np.float64).eps)


def _read_only(x: np.ndarray) -> np.ndarray:
    x.flags.writeable = False
    return x


@lru_cache(maxsize=8)
def bootstrap_counts(sizes: tuple[int, ...], n_resamples: int, seed: int) -> tuple[np.ndarray, ...]:
    """Per sample of ``sizes``, counts ``[R, n]`` (float64) of its units in each of R resamples, drawn one
    sample after the other from ``default_rng(seed)`` as ``scipy.stats.bootstrap`` does (one batch)."""
    rng = np.random.default_rng(seed)
    out = []
    for n in sizes:
        idx = rng.integers(0, n, (n_resamples, n))  # [R, n] drawn units
        flat = (idx + n * np.arange(n_resamples)[:, None]).ravel()
        out.append(
            _read_only(
                np.bincount(flat, minlength=n_resamples * n)
                .reshape(n_resamples, n)
                .astype(np.float64)
            )
        )
    return tuple(out)


def resampled_means(counts: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``[R, k]``: the mean of each column of ``x`` ``[n, k]`` on each resample, NaNs ignored (NaN when a
    resample draws no finite value of the column)."""
    finite = np.isfinite(x)
    if finite.all():
        return counts @ x / counts.shape[1]
    sums = counts @ np.where(finite, x, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums / (counts @ finite.astype(np.float64))


def percentile_interval(boot: np.ndarray, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    """The percentile interval of resamples ``boot`` ``[R, ...]``: its (1 − c)/2 and (1 + c)/2 quantiles
    (``scipy.stats.quantile``, linear interpolation, as ``scipy.stats.bootstrap``; ±inf resamples stay ±inf)."""
    alpha = (1 - confidence) / 2
    ci = stats.quantile(
        np.moveaxis(np.asarray(boot, dtype=np.float64), 0, -1),
        np.array([alpha, 1 - alpha]),
        axis=-1,
    )
    return ci[..., 0], ci[..., 1]


@lru_cache(maxsize=4)
def relabellings(n_a: int, n_b: int, n_permutations: int, seed: int) -> tuple[np.ndarray, bool]:
    """``(is_a [R', n_a + n_b] bool, exact)``: which pooled units (a's first) each relabelling puts in the
    first sample; every split when they fit in ``n_permutations`` (``exact``), else R ``permutation`` draws."""
    n = n_a + n_b
    if math.comb(n, n_a) <= n_permutations:
        splits = np.array(list(combinations(range(n), n_a)), dtype=np.int64).reshape(-1, n_a)
        is_a = np.zeros((len(splits), n), bool)
        np.put_along_axis(is_a, splits, True, axis=1)
        return _read_only(is_a), True
    rng = np.random.default_rng(seed)
    is_a = np.zeros((n_permutations, n), bool)
    for lo in range(0, n_permutations, _CHUNK):
        perms = np.stack(
            [rng.permutation(n) for _ in range(min(_CHUNK, n_permutations - lo))]
        )  # [r, n]
        np.put_along_axis(is_a[lo : lo + len(perms)], perms[:, :n_a], True, axis=1)
    return _read_only(is_a), False


@lru_cache(maxsize=4)
def sign_flips(n: int, n_permutations: int, seed: int) -> tuple[np.ndarray, bool]:
    """``(signs [R', n] of ±1 (int8), exact)``: which pairs each rearrangement swaps (−1); every pattern when 2ⁿ fits
    in ``n_permutations`` (``exact``), else R draws as ``permutation_test(permutation_type="samples")``."""
    if 2**n <= n_permutations:
        return _read_only(
            np.array(list(product((1, -1), repeat=n)), dtype=np.int8).reshape(-1, n)
        ), True
    rng = np.random.default_rng(seed)
    pairs = np.tile(
        np.arange(2), (n_permutations, n, 1)
    )  # scipy permutes each pair's two positions
    return _read_only(
        np.where(rng.permuted(pairs, axis=-1)[..., 0] == 1, -1, 1).astype(np.int8)
    ), False


def _times(rows: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``rows`` ``[R, n]`` (0/1 or ±1, stored small) @ ``x`` ``[n, k]`` in float64, a block of rows at a time."""
    out = np.empty((len(rows), x.shape[1]))
    for lo in range(0, len(rows), _CHUNK):
        out[lo : lo + _CHUNK] = rows[lo : lo + _CHUNK].astype(np.float64) @ x
    return out


def relabelled_mean_differences(
    a: np.ndarray, b: np.ndarray, n_permutations: int, seed: int
) -> tuple[np.ndarray, bool]:
    """``(null [R', k], exact)``: mean of b − mean of a, per column of ``a`` ``[n_a, k]`` and ``b`` ``[n_b, k]``,
    under each relabelling of the pooled units (``relabellings``; when exact, the first is the observed split):
    one matrix product for all of them, on values centred per column (a difference does not depend on a shift)."""
    n_a, n_b = len(a), len(b)
    is_a, exact = relabellings(n_a, n_b, n_permutations, seed)
    pooled = np.concatenate([a, b])
    pooled = pooled - pooled.mean(0)
    sum_a = _times(is_a, pooled)  # [R', k]
    return (pooled.sum(0) - sum_a) / n_b - sum_a / n_a, exact


def _welch_t(sum_a, sq_a, n_a, sum_b, sq_b, n_b) -> np.ndarray:
    """Welch's t of mean b − mean a from each group's sum and sum of squares (0 where both groups are constant
    and equal, ±inf where they are constant and differ)."""
    diff = sum_b / n_b - sum_a / n_a
    var_a = np.maximum(sq_a - sum_a**2 / n_a, 0.0) / max(n_a - 1, 1)
    var_b = np.maximum(sq_b - sum_b**2 / n_b, 0.0) / max(n_b - 1, 1)
    se = np.sqrt(var_a / n_a + var_b / n_b)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(se > 0, diff / se, np.where(diff == 0, 0.0, np.sign(diff) * np.inf))


def relabelled_welch_t(
    a: np.ndarray, b: np.ndarray, n_permutations: int, seed: int
) -> tuple[np.ndarray, np.ndarray, bool]:
    """``(null [R', k], observed [k], exact)``: Welch's t of mean b − mean a per column under each relabelling
    (``relabellings``) and on the observed split. Studentised, the permutation test stays valid for equal means
    when the groups' sizes and variances differ (Janssen 1997), where the raw difference does not; from two
    matrix products (sums and sums of squares), on values centred per column."""
    n_a, n_b = len(a), len(b)
    is_a, exact = relabellings(n_a, n_b, n_permutations, seed)
    pooled = np.concatenate([a, b])
    pooled = pooled - pooled.mean(0)
    squared = pooled**2
    sum_a, sq_a = _times(is_a, pooled), _times(is_a, squared)  # [R', k]
    null = _welch_t(sum_a, sq_a, n_a, pooled.sum(0) - sum_a, squared.sum(0) - sq_a, n_b)
    a_c, b_c = pooled[:n_a], pooled[n_a:]
    observed = _welch_t(a_c.sum(0), (a_c**2).sum(0), n_a, b_c.sum(0), (b_c**2).sum(0), n_b)
    return null, observed, exact


def sign_flipped_means(diff: np.ndarray, n_permutations: int, seed: int) -> tuple[np.ndarray, bool]:
    """``(null [R', k], exact)``: the mean of each column of paired differences ``diff`` ``[n, k]`` with the
    pairs swapped as ``sign_flips`` draws them (a swap negates a difference; when exact, the first pattern
    swaps none: the observed mean)."""
    signs, exact = sign_flips(len(diff), n_permutations, seed)
    return _times(signs, diff) / len(diff), exact


def permutation_pvalue(
    null: np.ndarray, observed, alternative: str, exact: bool, *, eps: float = _EPS
) -> np.ndarray:
    """p of ``observed`` ``[...]`` against ``null`` ``[R, ...]`` by ``scipy.stats.permutation_test``'s rule; ties
    within a relative 100·``eps`` (the precision the null was computed in) count as ≥ (≤)."""
    observed = np.asarray(observed, dtype=np.float64)
    gamma = np.abs(observed * eps * 100)
    adjust = 0 if exact else 1

    def share(hits):
        return (hits.sum(0) + adjust) / (len(null) + adjust)

    if alternative == "greater":
        return share(null >= observed - gamma)
    if alternative == "less":
        return share(null <= observed + gamma)
    return np.minimum(
        1.0, 2 * np.minimum(share(null >= observed - gamma), share(null <= observed + gamma))
    )
