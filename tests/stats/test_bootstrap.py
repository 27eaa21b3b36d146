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
