"""Circuit-complexity measures and the natural/synthetic ratio test.

Measures of a set of images (rows) x heads (columns) of per-image head values:

- ``participation_ratio``: (Σ_h e_h)² / Σ_h e_h² of the heads' mean positive ablation effects e_h
  — the effective number of heads that matter (1 if one head carries everything, H if all equally);
- ``heads_for_fraction``: how many heads, taken in order of effect, account for 90 % of Σ_h e_h
  (an additive approximation of "heads needed to keep 90 % of performance");
- ``mean_value``: the mean over rows and columns (for attention statistics such as normalised
  entropy or effective-keys fraction).

``ratio_test`` compares a measure between two image sets (b / a): percentile-bootstrap CI resampling
images within each set, and a permutation p-value from shuffling the set labels over images
(two-sided on |log ratio|, (count + 1)/(n + 1)).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["RatioResult", "heads_for_fraction", "mean_value", "participation_ratio", "ratio_test"]


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


@dataclass(frozen=True, kw_only=True)
class RatioResult:
    value_a: float
    value_b: float
    value: float  # value_b / value_a
    ci_low: float
    ci_high: float
    p_value: float
    n_permutations: int
    n_a: int
    n_b: int

    def to_dict(self) -> dict:
        return asdict(self)


def ratio_test(a: np.ndarray, b: np.ndarray, measure: Callable[[np.ndarray], float], *, n_boot: int = 1000,
               n_perm: int = 1000, confidence: float = 0.95, seed: int = 0) -> RatioResult:
    """measure(b) / measure(a) with a bootstrap CI over images and a label-permutation p-value."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    rng = np.random.default_rng(seed)
    va, vb = measure(a), measure(b)
    ratio = vb / va if va else float("nan")
    boot = np.array([measure(b[rng.integers(0, len(b), len(b))]) / measure(a[rng.integers(0, len(a), len(a))])
                     for _ in range(n_boot)])
    pooled = np.concatenate([a, b])
    observed = abs(np.log(ratio)) if ratio > 0 else np.inf
    hits = 0
    for _ in range(n_perm):
        perm = rng.permutation(len(pooled))
        r = measure(pooled[perm[len(a):]]) / measure(pooled[perm[: len(a)]])
        hits += bool(np.isfinite(r) and r > 0 and abs(np.log(r)) >= observed - 1e-12)
    alpha = 1 - confidence
    low, high = np.nanquantile(boot, [alpha / 2, 1 - alpha / 2])
    return RatioResult(value_a=va, value_b=vb, value=float(ratio), ci_low=float(low), ci_high=float(high),
                       p_value=(hits + 1) / (n_perm + 1), n_permutations=n_perm, n_a=len(a), n_b=len(b))
