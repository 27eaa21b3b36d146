"""Statistics against scipy/statsmodels on fixed data, and calibration on simulated nulls."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from statsmodels.stats.multitest import multipletests

from diffcircuit.stats.bootstrap import mean_ci
from diffcircuit.stats.tests import (
    cliffs_delta,
    cluster_bootstrap_ci,
    cohens_d,
    correct_pvalues,
    paired_test,
    two_sample_test,
)


def test_effect_sizes_against_direct_formulas():
    a = np.array([2.0, 3.5, 4.0, 5.5, 6.0])
    b = np.array([1.0, 1.5, 3.0, 2.0])
    pooled = np.sqrt((4 * a.var(ddof=1) + 3 * b.var(ddof=1)) / 7)
    assert cohens_d(a, b) == pytest.approx((a.mean() - b.mean()) / pooled)
    pairs = np.sign(a[:, None] - b[None, :])
    assert cliffs_delta(a, b) == pytest.approx(pairs.mean())


def test_exact_permutation_test_matches_enumeration():
    a, b = np.array([1.0, 2.0, 3.5]), np.array([4.0, 5.0, 6.5, 3.0])
    res = two_sample_test(a, b)
    pooled = np.concatenate([a, b])
    from itertools import combinations

    obs = abs(a.mean() - b.mean())
    diffs = []
    for idx in combinations(range(7), 3):
        mask = np.zeros(7, bool)
        mask[list(idx)] = True
        diffs.append(abs(pooled[mask].mean() - pooled[~mask].mean()))
    expected = np.mean(np.array(diffs) >= obs - 1e-12)
    assert res.p_value == pytest.approx(expected) and res.p_floor == 0.0 and res.n_resamples == 35


def test_randomized_p_value_is_never_zero():
    a, b = np.random.default_rng(0).normal(0, 1, 60), np.random.default_rng(1).normal(5, 1, 60)
    res = two_sample_test(a, b, n_resamples=999)
    assert res.p_value == pytest.approx(2 / 1000) and res.p_floor == pytest.approx(2 / 1000)  # two-sided floor


def test_paired_test_agrees_with_t_test_in_large_samples():
    rng = np.random.default_rng(2)
    before = rng.normal(0, 1, 200)
    after = before + rng.normal(0.15, 0.5, 200)
    res = paired_test(after, before, n_resamples=9999)
    t = stats.ttest_rel(after, before)
    assert res.p_value == pytest.approx(t.pvalue, abs=0.01)
    assert res.effect_size == pytest.approx((after - before).mean() / (after - before).std(ddof=1))


@pytest.mark.parametrize("method", ["fdr_bh", "holm"])
def test_correction_is_statsmodels(method):
    p = np.array([0.001, 0.01, 0.02, 0.04, 0.3, 0.9])
    np.testing.assert_allclose(correct_pvalues(p, method), multipletests(p, method=method)[1])


def test_cluster_bootstrap_is_wider_than_naive_when_samples_repeat():
    rng = np.random.default_rng(3)
    image_effect = rng.normal(0, 1, 40)
    values = np.repeat(image_effect, 10) + rng.normal(0, 0.1, 400)  # 10 timesteps per image, highly correlated
    clusters = np.repeat(np.arange(40), 10)
    _, lo_c, hi_c = cluster_bootstrap_ci(values, clusters)
    _, lo_n, hi_n = mean_ci(values)
    assert (hi_c - lo_c) > 2.5 * (hi_n - lo_n)


def test_permutation_test_false_positive_rate_is_nominal():
    """Split-half null on simulated data: 300 tests at α = 0.05 reject about 5 % of the time."""
    rng = np.random.default_rng(4)
    rejections = sum(two_sample_test(rng.normal(0, 1, 30), rng.normal(0, 1, 30), n_resamples=199, seed=k).p_value < 0.05
                     for k in range(300))
    lo, hi = stats.binom.ppf([0.001, 0.999], 300, 0.05)
    assert lo <= rejections <= hi


def test_bootstrap_ci_covers_the_true_mean_about_95_percent():
    rng = np.random.default_rng(5)
    covered = 0
    for k in range(300):
        _, lo, hi = mean_ci(rng.exponential(1.0, 60), n_resamples=500, seed=k)
        covered += lo <= 1.0 <= hi
    lo_n, hi_n = stats.binom.ppf([0.001, 0.999], 300, 0.93)  # percentile intervals undercover a little at n = 60
    assert lo_n <= covered and covered / 300 <= 0.99
