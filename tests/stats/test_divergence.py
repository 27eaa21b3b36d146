from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats
from scipy.spatial.distance import jensenshannon
from statsmodels.stats.multitest import multipletests

from diffcircuit.stats.divergence import (
    greater_p,
    head_jsd,
    mean_difference_test,
    null_critical,
    wasserstein_per_head,
    wasserstein_test,
)
from diffcircuit.stats.tests import independent_p_floor


def _splits(n_a: int, n_b: int):
    """Every relabelling of n_a + n_b pooled units: (indices of a, indices of b)."""
    units = range(n_a + n_b)
    for ia in itertools.combinations(units, n_a):
        yield list(ia), [i for i in units if i not in ia]


def test_head_jsd_matches_scipy_on_the_same_bins():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, (200, 3)), rng.normal(0.5, 1.3, (150, 3))
    got = head_jsd(a, b, bins=10)
    for h in range(3):
        edges = np.linspace(
            min(a[:, h].min(), b[:, h].min()), max(a[:, h].max(), b[:, h].max()), 11
        )
        p, _ = np.histogram(a[:, h], edges)
        q, _ = np.histogram(b[:, h], edges)
        assert got[h] == pytest.approx(
            jensenshannon(p / p.sum(), q / q.sum(), base=2) ** 2, abs=1e-9
        )


def test_head_jsd_extremes():
    a = np.zeros((50, 2)) + np.arange(50)[:, None] * 1e-3
    assert head_jsd(a, a.copy()) == pytest.approx([0, 0])
    assert head_jsd(np.zeros((20, 1)), np.ones((20, 1))) == pytest.approx([1.0])


def test_wasserstein_matches_scipy_with_ties_and_unequal_sizes():
    rng = np.random.default_rng(2)
    a, b = rng.normal(0, 1, (37, 4)), rng.gamma(2.0, 0.7, (23, 4))
    a[:5, 1] = b[:5, 1] = 0.5  # ties across the two sets
    expected = [stats.wasserstein_distance(a[:, h], b[:, h]) for h in range(4)]
    np.testing.assert_allclose(wasserstein_per_head(a, b), expected, rtol=1e-12)


def test_mean_difference_against_exhaustive_enumeration_and_statsmodels():
    rng = np.random.default_rng(3)
    a, b = rng.normal(0, 1, (4, 3)), rng.normal(1, 1, (5, 3))
    res = mean_difference_test(a, b)
    assert res.exact and res.n_permutations == math.comb(9, 4)
    pooled = np.concatenate([a, b])
    # the permutation statistic is Welch's t (scipy's), on every split
    welch = [
        stats.ttest_ind(pooled[ib], pooled[ia], equal_var=False).statistic
        for ia, ib in _splits(4, 5)
    ]
    null, observed = (
        np.array(welch),
        stats.ttest_ind(b, a, equal_var=False).statistic,
    )  # [126, 3], [3]
    tol = 1e-9
    expected = np.minimum(
        1, 2 * np.minimum((null >= observed - tol).mean(0), (null <= observed + tol).mean(0))
    )
    np.testing.assert_allclose(res.p_value, expected)
    np.testing.assert_allclose(res.difference, b.mean(0) - a.mean(0))
    np.testing.assert_allclose(res.q_value, multipletests(expected, method="fdr_bh")[1])
    assert res.ci_withheld == "4 images in a set (< 5)" and np.isnan(res.ci_low).all()
    assert res.p_floor == pytest.approx(2 / 126)


def test_equal_means_with_unequal_sizes_and_spreads_are_not_called_different():
    # permuting the raw difference rejects ~30 % of the time here (Behrens–Fisher); Welch's t keeps α
    rng = np.random.default_rng(7)
    p = [
        mean_difference_test(
            rng.normal(0, 3, (20, 1)), rng.normal(0, 1, (100, 1)), n_permutations=999, seed=k
        ).p_value[0]
        for k in range(300)
    ]
    rejected = np.mean(np.array(p) < 0.05)
    assert rejected <= 0.09  # 300 tests at α = 0.05: 0.05 ± 0.013 (sd)


def test_mean_difference_ci_matches_a_numpy_bootstrap_and_finds_the_planted_head():
    rng = np.random.default_rng(4)
    a, b = rng.normal(3, 0.2, (60, 5)), rng.normal(3, 0.2, (50, 5))
    b[:, 2] += 0.3  # the planted difference
    res = mean_difference_test(a, b, n_resamples=4000)
    boot = np.array(
        [
            b[rng.integers(0, 50, 50)].mean(0) - a[rng.integers(0, 60, 60)].mean(0)
            for _ in range(4000)
        ]
    )
    np.testing.assert_allclose(res.ci_low, np.quantile(boot, 0.025, axis=0), atol=0.012)
    np.testing.assert_allclose(res.ci_high, np.quantile(boot, 0.975, axis=0), atol=0.012)
    se = np.sqrt(a[:, 2].var(ddof=1) / 60 + b[:, 2].var(ddof=1) / 50)
    assert (
        res.ci_low[2] > 0
        and abs(res.difference[2] - 0.3) < 4 * se
        and res.q_value[2] < 0.01
        and res.can_reject
    )
    welch = stats.ttest_ind(b, a, equal_var=False).pvalue
    np.testing.assert_allclose(
        res.p_value, welch, atol=0.03
    )  # the permutation p agrees with Welch's at this n


def test_two_images_per_set_cannot_reject_and_give_no_interval():
    rng = np.random.default_rng(5)
    res = mean_difference_test(rng.normal(0, 1, (2, 3)), rng.normal(5, 1, (2, 3)))
    assert res.exact and res.n_permutations == 6 and res.p_floor == pytest.approx(1 / 3)
    assert (
        not res.can_reject and (res.p_value >= 1 / 3 - 1e-12).all() and res.ci_withheld is not None
    )


@pytest.mark.parametrize(
    "n_a,n_b,two_sided,swap",
    [(2, 2, True, False), (3, 3, False, True), (3, 4, False, True), (3, 4, True, False)],
)
def test_p_floor_is_the_smallest_p_any_relabelling_gives(n_a, n_b, two_sided, swap):
    """Enumerate every labelling of some data and take the smallest p: the floor must equal it."""
    x = np.random.default_rng(6).normal(size=n_a + n_b)
    stat = (
        (lambda ia, ib: abs(x[ib].mean() - x[ia].mean()))
        if swap
        else (lambda ia, ib: x[ib].mean() - x[ia].mean())
    )
    values = np.array([stat(ia, ib) for ia, ib in _splits(n_a, n_b)])
    ps = []
    for v in values:
        greater = (values >= v - 1e-12).mean()
        ps.append(min(1, 2 * min(greater, (values <= v + 1e-12).mean())) if two_sided else greater)
    assert min(ps) == pytest.approx(
        independent_p_floor(n_a, n_b, 10_000, two_sided=two_sided, swap_ties=swap)
    )
    assert independent_p_floor(50, 50, 999, two_sided=two_sided) == pytest.approx(
        (2 if two_sided else 1) / 1000
    )


def test_wasserstein_test_against_enumeration_and_a_separate_scipy_test():
    rng = np.random.default_rng(7)
    a, b = rng.normal(0, 1, (4, 3)), rng.normal(0.8, 1.5, (4, 3))
    res = wasserstein_test(a, b)
    pooled = np.concatenate([a, b])
    null = np.array(
        [
            [stats.wasserstein_distance(pooled[ia, h], pooled[ib, h]) for h in range(3)]
            for ia, ib in _splits(4, 4)
        ]
    )  # [70, 3]
    observed = null[0]  # the first split is the observed one
    np.testing.assert_allclose(res.per_head, observed)
    np.testing.assert_allclose(res.per_head_p, (null >= observed - 1e-12).mean(0))
    assert res.p_value == pytest.approx((null.mean(1) >= observed.mean() - 1e-12).mean())
    assert res.excess == pytest.approx(observed.mean() - null.mean())
    # randomized: the mean over heads' p equals scipy's own test of that statistic
    a, b = rng.normal(0, 1, (30, 3)), rng.normal(0.3, 1, (25, 3))
    res = wasserstein_test(a, b, n_permutations=999, seed=3)
    direct = stats.permutation_test(
        (np.arange(30), np.arange(30, 55)),
        lambda ia, ib: np.mean(
            [
                stats.wasserstein_distance(
                    np.concatenate([a, b])[ia, h], np.concatenate([a, b])[ib, h]
                )
                for h in range(3)
            ]
        ),
        permutation_type="independent",
        n_resamples=999,
        alternative="greater",
        vectorized=False,
        random_state=np.random.default_rng(3),
    )
    assert res.value == pytest.approx(direct.statistic) and res.p_value == pytest.approx(
        direct.pvalue
    )


def test_null_critical_agrees_with_the_p_value():
    """A statistic lies above the critical value exactly when its p < α (the report's figure relies on it)."""
    rng = np.random.default_rng(8)
    for trial in range(300):
        exact = bool(trial % 2)
        r = int(rng.choice([6, 19, 70, 199, 999]))
        null = rng.exponential(size=(r, 1)).round(2 if trial % 3 else 6)  # rounding makes ties
        observed = rng.choice(null[:, 0]) if trial % 5 == 0 else rng.exponential() * 2
        if exact:  # an exact null enumerates every split, the observed one among them
            null[0, 0] = observed
        p = greater_p(null, observed, exact=exact)[0]
        crit = null_critical(null, alpha=0.05, exact=exact)[0]
        assert (observed > crit) == (p < 0.05), (trial, r, exact)


def test_wasserstein_under_the_null_is_calibrated_and_its_excess_centred():
    rng = np.random.default_rng(9)
    results = [
        wasserstein_test(
            rng.normal(size=(12, 2)), rng.normal(size=(12, 2)), n_permutations=199, seed=k
        )
        for k in range(200)
    ]
    rejections = sum(r.p_value < 0.05 for r in results)
    lo, hi = stats.binom.ppf([0.0005, 0.9995], 200, 0.05)
    assert lo <= rejections <= hi
    excess = np.array([r.excess for r in results])
    assert abs(excess.mean()) < 3 * excess.std() / np.sqrt(len(excess))
    assert (
        np.mean([r.value for r in results]) > 0.1
    )  # the plug-in W alone is far from 0 under the null
