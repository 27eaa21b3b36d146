"""Statistics against scipy/statsmodels on fixed data, and calibration on simulated nulls."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from statsmodels.stats.multitest import multipletests

from diffcircuit.stats.bootstrap import mean_ci
from diffcircuit.stats.tests import (
    bootstrap_spearman,
    cliffs_delta,
    cluster_bootstrap_ci,
    cohens_d,
    correct_pvalues,
    paired_spearman_ci,
    paired_test,
    random_set_test,
    rank_p_value,
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
    # exact: the observed split is one of the 35, and the two-sided p doubles the one-sided floor
    assert (
        res.p_value == pytest.approx(expected)
        and res.p_floor == pytest.approx(2 / 35)
        and res.n_resamples == 35
    )


def test_randomized_p_value_is_never_zero():
    a, b = np.random.default_rng(0).normal(0, 1, 60), np.random.default_rng(1).normal(5, 1, 60)
    res = two_sample_test(a, b, n_resamples=999)
    assert res.p_value == pytest.approx(2 / 1000) and res.p_floor == pytest.approx(
        2 / 1000
    )  # two-sided floor


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
    values = np.repeat(image_effect, 10) + rng.normal(
        0, 0.1, 400
    )  # 10 timesteps per image, highly correlated
    clusters = np.repeat(np.arange(40), 10)
    _, lo_c, hi_c = cluster_bootstrap_ci(values, clusters)
    _, lo_n, hi_n = mean_ci(values)
    assert (hi_c - lo_c) > 2.5 * (hi_n - lo_n)


def test_permutation_test_false_positive_rate_is_nominal():
    """Split-half null on simulated data: 300 tests at α = 0.05 reject about 5 % of the time."""
    rng = np.random.default_rng(4)
    rejections = sum(
        two_sample_test(rng.normal(0, 1, 30), rng.normal(0, 1, 30), n_resamples=199, seed=k).p_value
        < 0.05
        for k in range(300)
    )
    lo, hi = stats.binom.ppf([0.001, 0.999], 300, 0.05)
    assert lo <= rejections <= hi


def test_bootstrap_ci_covers_the_true_mean_about_95_percent():
    rng = np.random.default_rng(5)
    covered = 0
    for k in range(300):
        _, lo, hi = mean_ci(rng.exponential(1.0, 60), n_resamples=500, seed=k)
        covered += lo <= 1.0 <= hi
    lo_n, hi_n = stats.binom.ppf(
        [0.001, 0.999], 300, 0.93
    )  # percentile intervals undercover a little at n = 60
    assert lo_n <= covered and covered / 300 <= 0.99


def test_one_sided_paired_test_matches_sign_flip_enumeration():
    from itertools import product

    diff = np.array([0.8, -0.3, 1.2, 0.5, -0.1, 0.9, 0.4, 0.7])
    flips = np.array(list(product([1, -1], repeat=len(diff))))  # all 256 sign patterns
    null = (flips * diff).mean(1)
    for alternative, expected in (
        ("greater", np.mean(null >= diff.mean() - 1e-12)),
        ("less", np.mean(null <= diff.mean() + 1e-12)),
    ):
        res = paired_test(diff, np.zeros_like(diff), alternative=alternative)
        assert res.p_value == pytest.approx(expected) and res.alternative == alternative
        assert res.p_floor == pytest.approx(1 / 256)
    with pytest.raises(ValueError, match="alternative"):
        paired_test(diff, diff, alternative="bigger")


def test_rank_p_value_is_the_monte_carlo_rank_and_is_exact_under_exchangeability():
    assert rank_p_value(5.0, [1.0, 6.0, 5.0, 2.0]) == pytest.approx(
        (1 + 2) / 5
    )  # ties count against
    assert rank_p_value(9.0, np.arange(100.0)) == pytest.approx((1 + 91) / 101)  # 9..99 are >= 9
    assert rank_p_value(1e9, np.arange(100.0)) == pytest.approx(1 / 101)
    rng = np.random.default_rng(6)
    draws = rng.normal(size=(2000, 20))  # the first column is exchangeable with the other 19
    p = np.array([rank_p_value(row[0], row[1:]) for row in draws])
    for alpha in (0.05, 0.1, 0.25):
        lo, hi = stats.binom.ppf([0.001, 0.999], 2000, np.floor(alpha * 20) / 20)
        assert lo <= (p <= alpha + 1e-12).sum() <= hi


def test_random_set_test_needs_to_beat_the_sets_not_their_mean():
    """The issue's case: a component clearly above the sets' mean, but exceeded by 2 of 10 sets, is not critical."""
    rng = np.random.default_rng(7)
    n, sets = 16, rng.normal(0, 1, 10)
    sets[:2] = [6.0, 7.0]  # two random sets are more harmful than the component
    null = sets[None, :] + rng.normal(0, 0.2, (n, 10))  # [images, sets]
    comp = 5.0 + rng.normal(0, 0.2, n)
    res = random_set_test(comp, null, seed=0)
    beaten = comp.mean() > null.mean(0)
    assert res.frac_beaten == pytest.approx(beaten.mean()) and res.frac_beaten == pytest.approx(0.8)
    assert res.p_sets == pytest.approx((1 + (~beaten).sum()) / 11)
    vs_mean = stats.permutation_test(
        (comp - null.mean(1),),
        np.mean,
        permutation_type="samples",
        alternative="greater",
        n_resamples=2000,
        random_state=0,
    )
    assert (
        vs_mean.pvalue < 0.01 and res.p_units < 0.01
    )  # today's test (the mean) would call it critical
    assert res.p_value == pytest.approx(max(res.p_sets, res.p_units)) and res.p_value > 0.2
    assert (
        res.excess == pytest.approx((comp - null.mean(1)).mean())
        and res.ci_low < res.excess < res.ci_high
    )
    assert res.null_q95 == pytest.approx(np.quantile(null.mean(0), 0.95))


def test_random_set_test_reaches_its_floor_and_is_calibrated():
    rng = np.random.default_rng(8)
    null = rng.normal(0, 1, (20, 100))
    res = random_set_test(5 + rng.normal(0, 1, 20), null, seed=0)
    assert (
        res.frac_beaten == 1.0
        and res.p_sets == pytest.approx(1 / 101)
        and res.p_floor == pytest.approx(1 / 101)
    )
    assert res.p_value == pytest.approx(1 / 101)  # below 1/11, the floor with 10 sets
    # a component that is one more random set: rejected at about the nominal rate or less (the IUT is conservative)
    rejected = 0
    for k in range(300):
        z = rng.normal(0, 1, (12, 1)) + rng.normal(
            0, 1, (12, 40)
        )  # image effects shared by every set
        rejected += random_set_test(z[:, 0], z[:, 1:], n_resamples=199, seed=k).p_value <= 0.05
    assert rejected <= stats.binom.ppf(0.999, 300, 0.05)


def test_bootstrap_spearman_against_scipy_bootstrap():
    rng = np.random.default_rng(9)
    truth = rng.normal(0, 1, 25)
    x = truth + rng.normal(0, 1.5, (30, 25))  # [images, heads]
    y = truth + rng.normal(0, 1.5, (30, 25))
    rho, low, high, n_ok = bootstrap_spearman(x, y, n_resamples=2000, seed=0)
    assert rho == pytest.approx(stats.spearmanr(x.mean(0), y.mean(0)).statistic) and n_ok == 2000
    ref = stats.bootstrap(
        (np.arange(30),),
        lambda i: stats.spearmanr(x[i].mean(0), y[i].mean(0)).statistic,
        vectorized=False,
        n_resamples=2000,
        method="percentile",
        random_state=1,
    ).confidence_interval
    assert low == pytest.approx(ref.low, abs=0.04) and high == pytest.approx(ref.high, abs=0.04)
    a, b = rng.normal(size=40), rng.normal(size=40)
    b += a
    rho, low, high, _ = paired_spearman_ci(a, b, n_resamples=2000, seed=0)
    ref = stats.bootstrap(
        (a, b),
        lambda u, v: stats.spearmanr(u, v).statistic,
        paired=True,
        vectorized=False,
        n_resamples=2000,
        method="percentile",
        random_state=1,
    ).confidence_interval
    assert rho == pytest.approx(stats.spearmanr(a, b).statistic) and low < rho < high
    assert low == pytest.approx(ref.low, abs=0.04) and high == pytest.approx(ref.high, abs=0.04)


def test_a_component_equal_to_every_null_member_ties_with_all_of_them():
    """Ties count against the component: equal columns give p_sets = 1 and beat no member (the component's and
    the members' means come from one reduction, so equal columns are equal to the last bit)."""
    from diffcircuit.stats.tests import random_set_tests

    rng = np.random.default_rng(0)
    for _ in range(
        100
    ):  # a strided column's sum and a column-wise sum could differ in the last bit
        x = rng.normal(size=(int(rng.integers(5, 60)), 1)) * 10 ** rng.uniform(-3, 3)
        units = np.repeat(x, 20, axis=1)  # the component (column 0) and 19 identical members
        (res,) = random_set_tests(units, [0], [np.arange(1, 20)], n_resamples=99)
        assert res.p_sets == 1.0 and res.frac_beaten == 0.0
