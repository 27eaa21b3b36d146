"""The matched-pairing permutation test, against exact enumeration and its null distribution."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import stats

from diffcircuit.stats.matching import permutation_excess, permutation_p


def _exact_p(blocks: list[np.ndarray]) -> float:
    """P(T_π ≥ T) over every combination of within-block permutations, enumerated."""
    observed = sum(np.trace(s) for s in blocks)
    per_block = [
        [sum(s[i, p[i]] for i in range(len(s))) for p in itertools.permutations(range(len(s)))]
        for s in blocks
    ]
    totals = np.array([sum(c) for c in itertools.product(*per_block)])
    return float(np.mean(totals >= observed - 1e-12))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_monte_carlo_p_matches_exact_enumeration_across_blocks(seed):
    rng = np.random.default_rng(seed)
    blocks = [rng.normal(size=(4, 4)) + np.eye(4) * 0.6, rng.normal(size=(5, 5)) + np.eye(5) * 0.3]
    excess = sum(
        permutation_excess(s[None], 20000, np.random.default_rng([seed, k]))
        for k, s in enumerate(blocks)
    )
    p = permutation_p(excess, sum(np.abs(np.diag(s)).sum() for s in blocks))[0]
    assert p == pytest.approx(_exact_p(blocks), abs=0.01)


def test_p_values_are_uniform_when_pairing_carries_nothing():
    """Scores from measurements and features drawn independently: the matched sum is one permutation among many."""
    rng = np.random.default_rng(0)
    ps = []
    for _ in range(400):
        u, v = rng.normal(size=(12, 1)), rng.normal(size=(1, 12))
        scores = np.tanh(u * v) + rng.normal(
            size=(12, 12)
        )  # S[i, j] = g(measurement i, features j) + noise
        ps.append(
            permutation_p(
                permutation_excess(scores[None], 199, rng), np.abs(np.diag(scores)).sum()
            )[0]
        )
    ps = np.array(ps)
    assert stats.kstest(ps, "uniform").pvalue > 0.01
    assert stats.binomtest(int((ps <= 0.05).sum()), len(ps), 0.05).pvalue > 0.01


def test_a_matched_preference_is_detected_at_the_floor():
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(2, 30, 30))
    scores[0] += 3 * np.eye(30)  # unit 0 prefers its own image's features; unit 1 does not
    p = permutation_p(
        permutation_excess(scores, 999, rng), np.abs(np.diagonal(scores, axis1=1, axis2=2)).sum(1)
    )
    assert p[0] == pytest.approx(1 / 1000)
    assert p[1] > 0.01


def test_identical_images_give_p_one():
    """Every image the same: any pairing gives the same sum, and a tie counts against the claim."""
    scores = np.tile(np.random.default_rng(2).normal(size=(8, 1)), (1, 8))[
        None
    ]  # S[i, j] independent of j
    assert permutation_p(permutation_excess(scores, 99, np.random.default_rng(0)), 10.0)[0] == 1.0
