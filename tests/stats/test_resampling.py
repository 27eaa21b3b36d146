"""Draws as matrices (bootstrap counts, relabellings, sign flips) against scipy and explicit resampling.

scipy's ``bootstrap`` and ``permutation_test`` with a fresh ``default_rng(seed)`` and no batching draw the
same resamples and permutations as ``stats.resampling``; so every statistic here must equal scipy's on
the same data and seed (up to float rounding), and a resampled mean from counts must equal the mean of
the explicitly resampled units.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from diffcircuit.stats.bootstrap import column_mean_cis, mean_ci
from diffcircuit.stats.complexity import participation_ratio, ratio_test
from diffcircuit.stats.divergence import mean_difference_test, wasserstein_test
from diffcircuit.stats.resampling import (
    bootstrap_counts,
    percentile_interval,
    permutation_pvalue,
    relabellings,
    resampled_means,
    sign_flips,
)
from diffcircuit.stats.tests import (
    paired_tests,
    random_set_test,
    random_set_tests,
    two_sample_tests,
)


def _mean_diff(x, y, axis=-1):
    return np.mean(x, axis=axis) - np.mean(y, axis=axis)


def test_counts_give_the_means_of_the_explicitly_resampled_units():
    x = np.random.default_rng(0).normal(size=(37, 4))
    idx = np.random.default_rng(5).integers(
        0, 37, (300, 37)
    )  # the draws scipy.stats.bootstrap makes for seed 5
    (counts,) = bootstrap_counts((37,), 300, 5)
    assert (counts.sum(1) == 37).all() and (
        counts == np.stack([np.bincount(i, minlength=37) for i in idx])
    ).all()
    np.testing.assert_allclose(resampled_means(counts, x), x[idx].mean(1), rtol=1e-13)
    x[::4, 1] = np.nan  # NaNs: the mean of each resample's finite values
    np.testing.assert_allclose(
        resampled_means(counts, x)[:, 1], np.nanmean(x[idx, 1], axis=1), rtol=1e-13
    )
    with pytest.raises(ValueError):
        counts[0, 0] = 1  # shared by every caller with this seed: read-only


def test_mean_ci_and_column_cis_equal_scipys_percentile_bootstrap_on_the_same_seed():
    rng = np.random.default_rng(1)
    x = np.column_stack([rng.exponential(2.0, 80), rng.normal(0, 1, 80), rng.gamma(0.5, 1, 80)])
    x[::7, 2] = np.nan
    for j in range(2):
        ref = stats.bootstrap(
            (x[:, j],),
            np.mean,
            n_resamples=2000,
            method="percentile",
            vectorized=True,
            random_state=np.random.default_rng(3),
        )
        _, low, high = mean_ci(x[:, j], n_resamples=2000, seed=3)
        assert (low, high) == pytest.approx(tuple(ref.confidence_interval), rel=1e-12)
    ref = stats.bootstrap(
        (x,),
        lambda s, axis: np.nanmean(s, axis=axis),
        axis=0,
        n_resamples=1000,
        method="percentile",
        vectorized=True,
        random_state=np.random.default_rng(4),
    )
    mean, low, high = column_mean_cis(x, n_resamples=1000, seed=4)
    np.testing.assert_allclose(low, ref.confidence_interval.low, rtol=1e-12)
    np.testing.assert_allclose(high, ref.confidence_interval.high, rtol=1e-12)
    np.testing.assert_allclose(mean, np.nanmean(x, 0))


def test_mean_ci_covers_the_true_mean_at_about_its_nominal_rate():
    """Independent of the draws: over 400 samples of 60 exponential values, a 95 % percentile interval covers
    the true mean 1 about 93–95 % of the time (slightly under for a skewed mean at n = 60)."""
    rng = np.random.default_rng(2)
    covered = sum(
        low <= 1.0 <= high
        for low, high in (
            mean_ci(rng.exponential(1.0, 60), n_resamples=1000, seed=k)[1:] for k in range(400)
        )
    )
    assert 0.89 * 400 <= covered <= 0.98 * 400


def test_two_sample_bootstrap_interval_equals_scipys_unpaired_bootstrap():
    rng = np.random.default_rng(6)
    a, b = rng.normal(0, 1, (40, 3)), rng.normal(0.4, 2, (55, 3))
    res = mean_difference_test(a, b, n_resamples=1500, seed=9)
    ref = stats.bootstrap(
        (a, b),
        lambda x, y, axis: _mean_diff(y, x, axis),
        axis=0,
        n_resamples=1500,
        paired=False,
        method="percentile",
        vectorized=True,
        random_state=np.random.default_rng(9),
    )
    np.testing.assert_allclose(res.ci_low, ref.confidence_interval.low, rtol=1e-12)
    np.testing.assert_allclose(res.ci_high, ref.confidence_interval.high, rtol=1e-12)


@pytest.mark.parametrize(
    "n_a,n_b,alternative",
    [(30, 25, "two-sided"), (30, 25, "greater"), (5, 4, "two-sided"), (4, 4, "less")],
)
def test_batched_two_sample_p_values_equal_scipys_per_column(n_a, n_b, alternative):
    """One relabelling matrix for all columns gives, column by column, scipy's p on the same seed (randomized
    and exact: C(9, 5) = 126 and C(8, 4) = 70 splits fit in 999)."""
    rng = np.random.default_rng(7)
    a, b = rng.normal(0, 1, (n_a, 4)), rng.normal(0.5, 1, (n_b, 4))
    found = two_sample_tests(a, b, alternative=alternative, n_resamples=999, seed=11)
    for j, res in enumerate(found):
        ref = stats.permutation_test(
            (a[:, j], b[:, j]),
            _mean_diff,
            permutation_type="independent",
            vectorized=True,
            n_resamples=999,
            alternative=alternative,
            random_state=np.random.default_rng(11),
        )
        assert res.p_value == pytest.approx(ref.pvalue, rel=1e-12) and res.n_resamples == len(
            ref.null_distribution
        )
        assert res.statistic == pytest.approx(ref.statistic)


def test_mean_difference_p_values_equal_scipys_on_the_next_seed():
    rng = np.random.default_rng(8)
    a, b = rng.normal(0, 1, (50, 3)), rng.normal(0.3, 1, (45, 3))
    res = mean_difference_test(a, b, n_permutations=1999, seed=4)
    for j in range(3):  # the statistic permuted is Welch's t of b − a (scipy's)
        ref = stats.permutation_test(
            (a[:, j], b[:, j]),
            lambda x, y, axis: stats.ttest_ind(y, x, axis=axis, equal_var=False).statistic,
            permutation_type="independent",
            vectorized=True,
            n_resamples=1999,
            random_state=np.random.default_rng(5),
        )
        assert res.p_value[j] == pytest.approx(ref.pvalue, rel=1e-12)


@pytest.mark.parametrize("n,alternative", [(40, "two-sided"), (40, "greater"), (8, "two-sided")])
def test_batched_sign_flips_equal_scipys_paired_test_per_column(n, alternative):
    rng = np.random.default_rng(9)
    before = rng.normal(0, 1, (n, 5))
    after = before + rng.normal(0.2, 1, (n, 5))
    found = paired_tests(after, before, alternative=alternative, n_resamples=999, seed=2)
    for j, res in enumerate(found):
        ref = stats.permutation_test(
            (after[:, j], before[:, j]),
            _mean_diff,
            permutation_type="samples",
            vectorized=True,
            n_resamples=999,
            alternative=alternative,
            random_state=np.random.default_rng(2),
        )
        assert res.p_value == pytest.approx(ref.pvalue, rel=1e-12)
    assert found[0].n_resamples == (2**8 if n == 8 else 999)


def test_exact_enumerations_by_hand():
    is_a, exact = relabellings(2, 2, 100, 0)
    assert exact and sorted(map(tuple, is_a.astype(int))) == sorted(
        [(1, 1, 0, 0), (1, 0, 1, 0), (1, 0, 0, 1), (0, 1, 1, 0), (0, 1, 0, 1), (0, 0, 1, 1)]
    )
    assert tuple(is_a[0]) == (True, True, False, False)  # the observed split first
    signs, exact = sign_flips(3, 8, 0)
    assert exact and len({tuple(s) for s in signs}) == 8 and (signs[0] == 1).all()
    # two sets {0, 1} vs {2, 3}: of the 6 splits, the observed and its mirror are the most extreme
    res = two_sample_tests(np.array([0.0, 1.0]), np.array([2.0, 3.0]), n_resamples=100)[0]
    assert res.p_value == pytest.approx(2 / 6) and res.p_floor == pytest.approx(2 / 6)
    # all three pairs up by 1: only "no swap" reaches a mean of +1 among the 8 sign patterns
    res = paired_tests(
        np.array([1.0, 2.0, 3.0]), np.array([0.0, 1.0, 2.0]), alternative="greater", n_resamples=8
    )[0]
    assert res.p_value == pytest.approx(1 / 8) and res.n_resamples == 8


def test_an_exact_observed_split_ties_with_itself_whatever_the_offset():
    """Values far from 0 and differences far below them: the observed split still counts among the enumerated
    ones, so p never drops below its floor (rounding would otherwise lose the observed arrangement)."""
    a = 1e6 + np.array([[0.0], [1e-7], [2e-7]])
    res = two_sample_tests(a, a + 3e-7, alternative="less", n_resamples=100)[0]
    assert res.p_value >= res.p_floor - 1e-15 and res.p_value == pytest.approx(1 / 20)


def test_permutation_pvalue_rule_by_hand():
    null = np.array([1.0, 2.0, 3.0, 4.0])
    assert permutation_pvalue(null, 3.0, "greater", True) == pytest.approx(2 / 4)
    assert permutation_pvalue(null, 3.0, "greater", False) == pytest.approx(3 / 5)
    assert permutation_pvalue(null, 3.0, "less", False) == pytest.approx(4 / 5)
    assert permutation_pvalue(null, 1.0, "two-sided", True) == pytest.approx(2 * 1 / 4)
    assert permutation_pvalue(null, 3.0 + 1e-15, "greater", True) == pytest.approx(
        2 / 4
    )  # a tie within rounding
    low, high = percentile_interval(np.arange(101.0), 0.9)
    assert (low, high) == pytest.approx((5.0, 95.0), rel=1e-12)


def test_ratio_test_resamples_and_relabellings_equal_explicit_ones():
    rng = np.random.default_rng(10)
    a, b = rng.gamma(2.0, 1.0, (12, 6)), rng.gamma(2.0, 1.3, (14, 6))
    res = ratio_test(a, b, participation_ratio, n_boot=500, n_perm=300, seed=3)
    draws = np.random.default_rng(3)
    ia, ib = draws.integers(0, 12, (500, 12)), draws.integers(0, 14, (500, 14))
    boot = np.log([participation_ratio(b[j]) / participation_ratio(i) for i, j in zip(a[ia], ib)])
    assert res.se_log_ratio == pytest.approx(boot.std(ddof=1), rel=1e-10)
    assert (res.ci_low, res.ci_high) == pytest.approx(
        tuple(np.exp(np.quantile(boot, [0.025, 0.975]))), rel=1e-10
    )
    pooled = np.concatenate([a, b])
    ref = stats.permutation_test(
        (np.arange(12), np.arange(12, 26)),
        lambda i, j: abs(np.log(participation_ratio(pooled[j]) / participation_ratio(pooled[i]))),
        permutation_type="independent",
        vectorized=False,
        n_resamples=300,
        alternative="greater",
        random_state=np.random.default_rng(4),
    )
    assert res.p_value == pytest.approx(ref.pvalue, rel=1e-12)


def test_wasserstein_per_head_p_equals_scipys_test_of_each_head():
    rng = np.random.default_rng(11)
    a, b = rng.normal(0, 1, (25, 3)), rng.normal(0.4, 1.3, (20, 3))
    res = wasserstein_test(a, b, n_permutations=499, seed=6)
    pooled = np.concatenate([a, b])
    for h in range(3):
        ref = stats.permutation_test(
            (np.arange(25), np.arange(25, 45)),
            lambda i, j, h=h: stats.wasserstein_distance(pooled[i, h], pooled[j, h]),
            permutation_type="independent",
            vectorized=False,
            n_resamples=499,
            alternative="greater",
            random_state=np.random.default_rng(6),
        )
        assert res.per_head_p[h] == pytest.approx(ref.pvalue, abs=1e-12)
        assert res.per_head_null_mean[h] == pytest.approx(np.mean(ref.null_distribution), rel=1e-5)


def test_random_set_tests_batched_equal_each_alone_and_scipys_sign_flip():
    rng = np.random.default_rng(12)
    units = (
        rng.normal(0, 1, (30, 12)) + np.r_[2.0, 0.5, np.zeros(10)]
    )  # columns 0, 1: components; 2..11: null
    tested, nulls = [0, 1], [np.arange(2, 12), np.arange(4, 12)]
    together = random_set_tests(units, tested, nulls, n_resamples=800, seed=5)
    for c, members, res in zip(tested, nulls, together):
        alone = random_set_test(units[:, c], units[:, members], n_resamples=800, seed=5)
        assert res.to_dict() == pytest.approx(alone.to_dict(), rel=1e-12)
        excess = units[:, c] - units[:, members].mean(1)
        ref = stats.permutation_test(
            (excess,),
            np.mean,
            permutation_type="samples",
            vectorized=True,
            n_resamples=800,
            alternative="greater",
            random_state=np.random.default_rng(5),
        )
        assert res.p_units == pytest.approx(ref.pvalue, rel=1e-12)
        idx = np.random.default_rng(5).integers(0, 30, (800, 30))
        assert (res.ci_low, res.ci_high) == pytest.approx(
            tuple(np.quantile(excess[idx].mean(1), [0.025, 0.975]))
        )
        beaten = (units[idx, c].mean(1)[:, None] > units[idx][:, :, members].mean(1)).mean(1)
        assert res.frac_beaten_ci_low == pytest.approx(np.quantile(beaten, 0.025))


def test_draws_for_a_seed_are_shared_and_differ_between_seeds():
    assert bootstrap_counts((9,), 50, 1)[0] is bootstrap_counts((9,), 50, 1)[0]
    assert not np.array_equal(bootstrap_counts((9,), 50, 1)[0], bootstrap_counts((9,), 50, 2)[0])
    flips = [sign_flips(20, 500, s)[0] for s in (0, 1)]
    assert flips[0].shape == (500, 20) and not np.array_equal(*flips)
    is_a, exact = relabellings(10, 12, 500, 0)
    assert not exact and (is_a.sum(1) == 10).all() and len({tuple(r) for r in is_a}) > 490


def test_one_pair_and_one_image_per_side_give_undefined_effect_sizes_without_warnings():
    """d_z of a single difference and d of one image per side have no SD: NaN, and no numpy warning
    (a run with --ablate-n 1 once printed 'Degrees of freedom <= 0'); the p-values stay the exact ones."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (paired,) = paired_tests(np.array([[2.0]]), np.array([[1.0]]), alternative="greater")
        (unpaired,) = two_sample_tests(np.array([[2.0]]), np.array([[1.0]]))
    assert np.isnan(paired.effect_size) and np.isnan(unpaired.effect_size)
    assert paired.p_value == 0.5  # the two sign flips of +1: one is >= it
    assert unpaired.p_value == 1.0  # the two labellings, two-sided: both as extreme
