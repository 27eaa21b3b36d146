from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import stats

from diffcircuit.stats.bootstrap import contains_estimate
from diffcircuit.stats.complexity import (
    ColumnMeasure,
    heads_for_fraction,
    mean_value,
    minimal_detectable_ratio,
    participation_ratio,
    ratio_test,
)


def test_participation_ratio_and_heads_needed_on_known_profiles():
    one = np.array([[10.0, 0, 0, 0]])
    flat = np.array([[2.0, 2, 2, 2]])
    assert participation_ratio(one) == pytest.approx(1.0) and participation_ratio(
        flat
    ) == pytest.approx(4.0)
    assert heads_for_fraction(one) == 1 and heads_for_fraction(flat) == 4
    # negative effects (ablation helped) count as zero; 90 % of 10 is reached by 5 + 3 + 1
    assert heads_for_fraction(np.array([[5.0, 3, 1, 1, -4]])) == 3
    assert mean_value(np.array([[1.0, np.nan], [3.0, 5.0]])) == pytest.approx(3.0)


def test_the_ratio_test_reports_each_sets_noise_beside_a_null_of_equal_distributions():
    # equal mean effects, per-image sd 0.5 on a and 1.5 on b: the plug-in participation ratio of b is larger
    # (noise counts as heads that matter) and the label permutation, whose null is equal distributions,
    # rejects most of the time; the noise it reacts to is reported beside it
    rng = np.random.default_rng(6)
    mu = np.zeros(72)
    mu[:4], mu[4:8] = 2.0, 1.0
    rejected = 0
    for k in range(20):
        a, b = mu + rng.normal(0, 0.5, (16, 72)), mu + rng.normal(0, 1.5, (16, 72))
        res = ratio_test(a, b, participation_ratio, n_boot=10, n_perm=199, seed=k)
        rejected += res.p_value < 0.05 and res.value > 1
        assert res.noise_a == pytest.approx(
            np.mean(a.std(0, ddof=1) / 4)
        )  # s / √16, mean over heads
        assert res.noise_b == pytest.approx(np.mean(b.std(0, ddof=1) / 4))
    assert rejected >= 10


def test_ratio_test_detects_a_real_difference_and_not_a_null_one():
    rng = np.random.default_rng(0)
    a = rng.normal(1.0, 0.3, (60, 5))
    same = ratio_test(a, rng.normal(1.0, 0.3, (60, 5)), mean_value, n_boot=300, n_perm=300)
    diff = ratio_test(a, rng.normal(1.3, 0.3, (60, 5)), mean_value, n_boot=300, n_perm=300)
    assert same.p_value > 0.05 and same.ci_low < 1 < same.ci_high
    assert (
        diff.p_value == pytest.approx(1 / 301)
        and diff.ci_low < diff.value < diff.ci_high
        and diff.ci_low > 1.15
    )


def test_ratio_test_false_positive_rate():
    rng = np.random.default_rng(1)
    rejections = sum(
        ratio_test(
            rng.normal(1, 0.3, (20, 3)),
            rng.normal(1, 0.3, (20, 3)),
            mean_value,
            n_boot=10,
            n_perm=99,
            seed=k,
        ).p_value
        < 0.05
        for k in range(200)
    )
    from scipy import stats

    lo, hi = stats.binom.ppf([0.001, 0.999], 200, 0.05)
    assert lo <= rejections <= hi


def test_two_images_per_set_give_an_exact_p_no_interval_and_no_claim():
    """The n = 2 case of issue 15: 6 splits, the observed one and its mirror tie, so p ≥ 1/3."""
    rng = np.random.default_rng(2)
    a, b = rng.normal(1, 0.1, (2, 4)), rng.normal(1.5, 0.1, (2, 4))
    res = ratio_test(a, b, mean_value)
    pooled = np.concatenate([a, b])
    logs = [
        abs(np.log(pooled[list(ib)].mean() / pooled[list(ia)].mean()))
        for ia in itertools.combinations(range(4), 2)
        for ib in [[i for i in range(4) if i not in ia]]
    ]
    assert res.exact and res.n_permutations == 6
    assert res.p_value == pytest.approx(np.mean(np.array(logs) >= abs(np.log(res.value)) - 1e-12))
    assert res.p_floor == pytest.approx(1 / 3) and not res.can_reject
    assert (
        np.isnan(res.ci_low)
        and res.ci_withheld == "2 images in a set (< 5)"
        and np.isnan(res.mde_ratio)
    )


def test_relabellings_with_an_undefined_ratio_count_as_extreme():
    """Exact enumeration: a split whose participation ratio is undefined on one side (all its effects <= 0)
    counts as at least as extreme as the observed ratio, never as less."""
    a = np.array([[4.0, 1.0], [3.0, 1.0], [5.0, 2.0]])
    b = np.array([[-9.0, -9.0], [2.0, 2.0], [8.0, 9.0]])
    res = ratio_test(a, b, participation_ratio, n_perm=1000)
    pooled = np.concatenate([a, b])
    observed = abs(np.log(participation_ratio(b) / participation_ratio(a)))
    count, total = 0, 0
    for ia in itertools.combinations(range(6), 3):
        ib = [i for i in range(6) if i not in ia]
        va, vb = participation_ratio(pooled[list(ia)]), participation_ratio(pooled[ib])
        undefined = not (va > 0 and vb > 0)  # NaN ratio
        count += undefined or abs(np.log(vb / va)) >= observed - 1e-12
        total += 1
    assert res.exact and res.n_permutations == total == 20
    assert 0 < count - 1 < total  # some splits are undefined, and the test is not trivial
    assert res.p_value == pytest.approx(count / total)


def test_minimal_detectable_ratio_has_the_stated_power():
    for se in (0.01, 0.05, 0.2):
        delta = np.log(minimal_detectable_ratio(se))
        power = stats.norm.cdf(delta / se - stats.norm.ppf(0.975)) + stats.norm.cdf(
            -delta / se - stats.norm.ppf(0.975)
        )
        assert power == pytest.approx(0.8, abs=1e-4)


def test_standard_error_matches_the_delta_method():
    rng = np.random.default_rng(4)
    a, b = rng.gamma(4, 0.25, (150, 6)), rng.gamma(4, 0.3, (120, 6))
    res = ratio_test(a, b, mean_value, n_boot=2000, n_perm=99)
    ma, mb = a.mean(1), b.mean(1)  # the measure is the mean of per-image means
    delta = np.sqrt(
        ma.var(ddof=1) / (len(ma) * ma.mean() ** 2) + mb.var(ddof=1) / (len(mb) * mb.mean() ** 2)
    )
    assert res.se_log_ratio == pytest.approx(delta, rel=0.1)
    assert res.mde_ratio == pytest.approx(np.exp(2.8016 * res.se_log_ratio), rel=1e-3)


def test_an_interval_that_would_exclude_its_estimate_is_withheld():
    """The max of 400 noisy column means is biased upward under resampling (b), far more than for the
    almost noiseless a: the percentile interval of the ratio lies above the estimate."""
    rng = np.random.default_rng(5)
    a, b = rng.normal(10, 0.01, (8, 400)), rng.normal(10, 1, (8, 400))
    largest_mean = ColumnMeasure(
        "largest column mean", lambda sums, counts: np.max(sums / counts, axis=-1)
    )
    assert largest_mean(b) == pytest.approx(np.max(b.mean(0)))
    res = ratio_test(a, b, largest_mean, n_boot=400, n_perm=99)
    assert (
        np.isnan(res.ci_low)
        and "excludes the estimate" in res.ci_withheld
        and np.isfinite(res.p_value)
    )


def test_no_reported_interval_excludes_its_estimate():
    rng = np.random.default_rng(6)
    for k in range(40):
        n = int(rng.integers(5, 12))
        a, b = rng.gamma(1.5, 1, (n, 12)), rng.gamma(1.5, 1.2, (n + int(rng.integers(0, 3)), 12))
        for measure in (participation_ratio, heads_for_fraction, mean_value):
            res = ratio_test(a, b, measure, n_boot=200, n_perm=99, seed=k)
            assert res.ci_withheld is not None or contains_estimate(
                res.value, res.ci_low, res.ci_high
            )


def test_split_half_calibration_verdicts():
    from diffcircuit.commands.calibrate import rate_verdict

    assert (
        rate_verdict(10, 200, nominal=0.05, worst=0.1, kind="fpr").verdict
        == "consistent with nominal"
    )
    assert (
        rate_verdict(5, 100, nominal=0.05, worst=0.1, kind="fpr").verdict
        == "too few splits to tell"
    )
    assert (
        rate_verdict(30, 200, nominal=0.05, worst=0.1, kind="fpr").verdict
        == "miscalibrated (anti-conservative)"
    )
    assert (
        rate_verdict(0, 200, nominal=0.05, worst=0.1, kind="fpr").verdict
        == "miscalibrated (conservative)"
    )
    low = rate_verdict(7, 10, nominal=0.95, worst=0.9, kind="coverage")
    ci = stats.binomtest(7, 10).proportion_ci(0.95, method="exact")
    assert low.verdict == "miscalibrated (undercovers)" and (
        low.ci_low,
        low.ci_high,
    ) == pytest.approx((ci.low, ci.high))
    assert (
        rate_verdict(190, 200, nominal=0.95, worst=0.9, kind="coverage").verdict
        == "consistent with nominal"
    )


def test_split_half_calibration_on_simulated_data():
    from diffcircuit.commands.calibrate import split_half_calibration

    rng = np.random.default_rng(7)
    rows = {
        "mean_entropy_norm": rng.gamma(4.0, 0.25, (80, 6)),
        "ablation_participation_ratio": rng.gamma(2.0, 1.0, (80, 12)),
    }
    res = split_half_calibration(rows, splits=300, n_boot=200, n_perm=99)
    assert [m.measure for m in res.measures] == [
        "ablation_participation_ratio",
        "mean_entropy_norm",
    ]  # primary first
    for m in res.measures:
        lo, hi = stats.binom.ppf([0.0005, 0.9995], 300, 0.05) / 300
        assert lo <= m.false_positive.rate <= hi and m.false_positive.n == 300
        assert (
            stats.binom.ppf(0.0005, 300, 0.95) / 300 - 0.03 <= m.coverage.rate <= 1.0
        )  # percentile CIs at 40 a half
    assert res.false_positive_rate == res.measures[0].false_positive.rate
    small = split_half_calibration(rows["mean_entropy_norm"][:8], splits=10)
    assert (
        small.measures[0].coverage.verdict == "no intervals at this n"
        and small.verdict == "no intervals at this n"
    )
    tiny = split_half_calibration(rows["mean_entropy_norm"][:4], splits=5)
    assert tiny.measures[0].false_positive.verdict == "cannot reject at this n"
