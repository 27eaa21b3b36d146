from __future__ import annotations

import numpy as np
import pytest

from diffcircuit.stats.complexity import heads_for_fraction, mean_value, participation_ratio, ratio_test


def test_participation_ratio_and_heads_needed_on_known_profiles():
    one = np.array([[10.0, 0, 0, 0]])
    flat = np.array([[2.0, 2, 2, 2]])
    assert participation_ratio(one) == pytest.approx(1.0) and participation_ratio(flat) == pytest.approx(4.0)
    assert heads_for_fraction(one) == 1 and heads_for_fraction(flat) == 4
    # negative effects (ablation helped) count as zero; 90 % of 10 is reached by 5 + 3 + 1
    assert heads_for_fraction(np.array([[5.0, 3, 1, 1, -4]])) == 3
    assert mean_value(np.array([[1.0, np.nan], [3.0, 5.0]])) == pytest.approx(3.0)


def test_ratio_test_detects_a_real_difference_and_not_a_null_one():
    rng = np.random.default_rng(0)
    a = rng.normal(1.0, 0.3, (60, 5))
    same = ratio_test(a, rng.normal(1.0, 0.3, (60, 5)), mean_value, n_boot=300, n_perm=300)
    diff = ratio_test(a, rng.normal(1.3, 0.3, (60, 5)), mean_value, n_boot=300, n_perm=300)
    assert same.p_value > 0.05 and same.ci_low < 1 < same.ci_high
    assert diff.p_value == pytest.approx(1 / 301) and diff.ci_low < diff.value < diff.ci_high and diff.ci_low > 1.15


def test_ratio_test_false_positive_rate():
    rng = np.random.default_rng(1)
    rejections = sum(ratio_test(rng.normal(1, 0.3, (20, 3)), rng.normal(1, 0.3, (20, 3)), mean_value, n_boot=10,
                                n_perm=99, seed=k).p_value < 0.05 for k in range(200))
    from scipy import stats

    lo, hi = stats.binom.ppf([0.001, 0.999], 200, 0.05)
    assert lo <= rejections <= hi


def test_split_half_calibration_on_simulated_data():
    from scipy import stats

    from diffcircuit.protocol.calibrate import split_half_calibration

    rows = np.random.default_rng(7).gamma(4.0, 0.25, (80, 6))
    res = split_half_calibration(rows, splits=300, n_boot=150, n_perm=99)
    lo, hi = stats.binom.ppf([0.0005, 0.9995], 300, 0.05) / 300
    assert lo <= res.false_positive_rate <= hi
    lo_c = stats.binom.ppf(0.0005, 300, 0.95) / 300
    assert lo_c - 0.03 <= res.coverage <= 1.0  # percentile intervals may undercover slightly at n = 40 per half
