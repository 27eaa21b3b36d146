from __future__ import annotations

import numpy as np
import pytest

from diffcircuit.stats.bootstrap import mean_ci


def test_ci_brackets_the_mean_and_matches_the_normal_approximation():
    x = np.random.default_rng(0).normal(3.0, 2.0, size=400)
    mean, low, high = mean_ci(x)
    assert low < mean < high and mean == pytest.approx(x.mean())
    half = 1.96 * x.std(ddof=1) / np.sqrt(len(x))
    assert (high - low) / 2 == pytest.approx(half, rel=0.15)


def test_degenerate_samples():
    assert mean_ci([2.0]) == (2.0, 2.0, 2.0)
    assert mean_ci([1.0, 1.0, 1.0]) == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError):
        mean_ci([])


def test_column_cis_agree_with_single_column_bootstrap_and_skip_nans():
    from diffcircuit.stats.bootstrap import column_mean_cis

    rng = np.random.default_rng(3)
    x = np.column_stack(
        [rng.normal(0, 1, 300), rng.exponential(2.0, 300), np.full(300, 5.0), np.full(300, np.nan)]
    )
    x[::10, 1] = np.nan
    mean, low, high = column_mean_cis(x, n_resamples=2000, seed=1)
    m0, l0, h0 = mean_ci(x[:, 0], n_resamples=2000, seed=1)
    assert (
        mean[0] == pytest.approx(m0)
        and low[0] == pytest.approx(l0, abs=0.03)
        and high[0] == pytest.approx(h0, abs=0.03)
    )
    assert mean[1] == pytest.approx(np.nanmean(x[:, 1])) and low[1] < mean[1] < high[1]
    assert (mean[2], low[2], high[2]) == (5.0, 5.0, 5.0)
    assert np.isnan(mean[3])
