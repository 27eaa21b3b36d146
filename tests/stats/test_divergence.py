from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.distance import jensenshannon

from diffcircuit.stats.divergence import head_jsd, mean_jsd_test


def test_head_jsd_matches_scipy_on_the_same_bins():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, (200, 3)), rng.normal(0.5, 1.3, (150, 3))
    got = head_jsd(a, b, bins=10)
    for h in range(3):
        edges = np.linspace(min(a[:, h].min(), b[:, h].min()), max(a[:, h].max(), b[:, h].max()), 11)
        p, _ = np.histogram(a[:, h], edges)
        q, _ = np.histogram(b[:, h], edges)
        assert got[h] == pytest.approx(jensenshannon(p / p.sum(), q / q.sum(), base=2) ** 2, abs=1e-9)


def test_extremes():
    a = np.zeros((50, 2)) + np.arange(50)[:, None] * 1e-3
    assert head_jsd(a, a.copy()) == pytest.approx([0, 0])
    assert head_jsd(np.zeros((20, 1)), np.ones((20, 1))) == pytest.approx([1.0])


def test_permutation_test_separates_same_from_different_distributions():
    rng = np.random.default_rng(1)
    same = mean_jsd_test(rng.normal(0, 1, (100, 4)), rng.normal(0, 1, (100, 4)), n_boot=200, n_perm=200, seed=0)
    diff = mean_jsd_test(rng.normal(0, 1, (100, 4)), rng.normal(1.5, 1, (100, 4)), n_boot=200, n_perm=200, seed=0)
    assert same.p_value > 0.05 and diff.p_value == pytest.approx(1 / 201)
    assert diff.ci_low <= diff.bias_corrected <= diff.ci_high
    assert diff.value > diff.null_value > 0  # the plug-in null is > 0: the bias the report warns about
