"""The discovery engine: searches run in lockstep on the stacked, memoised circuit losses (the losses
themselves: ``test_loss.py``).

References: a copy of the one-search-at-a-time galloping pruning run on the plain loss (one head set per
plain forward, the ``plain_loss`` fixture), and forward counts from ``count_forwards``.
"""

from __future__ import annotations

import numpy as np
import pytest

from diffcircuit.discovery.circuits import CircuitLoss, passes_tau, prune_circuit, prune_heads
from diffcircuit.discovery.lockstep import lockstep
from diffcircuit.instrument.cost import count_forwards
from diffcircuit.interventions import ablation_sweep, targets
from diffcircuit.protocol.circuits import PRIMARY_TAU, discover_circuits, importance_rows

T = 300


def _galloping(loss, importance, tau, draw=None):
    """The grouped pruning search written out on its own, one loss value at a time (``draw``: a resample's images)."""

    def value(s):
        v = loss.per_image(s)
        return float((v if draw is None else v[draw]).mean())

    full, empty = value([]), value(loss.heads)
    if empty <= full:
        return ()
    order = sorted(loss.heads, key=lambda a: (importance.get(a, 0.0), str(a)))
    removed, i, size = [], 0, 1
    while i < len(order):
        run = order[i : i + size]
        if passes_tau(value([*removed, *run]), full, empty, tau):
            removed += run
            i, size = i + len(run), 2 * size
        elif size == 1:
            i += 1
        else:
            size //= 2
    return tuple(sorted(a for a in loss.heads if a not in removed))


@pytest.fixture(scope="module")
def ranked(embedded):
    den, images, registry = embedded
    table = ablation_sweep(
        den,
        images,
        targets=targets(registry, "head"),
        methods=["mean"],
        timesteps=[T],
        registry=registry,
    )
    return importance_rows(table.assign(dataset="a"))


@pytest.mark.parametrize("lookahead", [1, 4])
def test_lockstep_discovery_finds_the_circuits_of_one_search_at_a_time(
    embedded, ranked, plain_loss, lookahead
):
    """The point estimate at every τ and each resample's circuit (the same draws) equal the galloping search run
    alone on the plain loss, with importance re-estimated on each resample's images (repeats counted)."""
    den, images, registry = embedded
    taus, resamples = (0.02, PRIMARY_TAU), 4
    with count_forwards(den.network) as cost:
        table, (c,), _ = discover_circuits(
            den,
            {"a": images},
            ranked,
            registry=registry,
            windows=[(T,)],
            taus=taus,
            resamples=resamples,
            lookahead=lookahead,
        )
    plain = plain_loss(den, images, registry, [T])
    scores = {
        registry.parse(t): v for t, v in ranked.groupby("target").degradation_pct.mean().items()
    }
    for tau in taus:
        expected = _galloping(plain, scores, tau)
        got = table[(table.tau == tau) & table.in_circuit]["head"]
        assert sorted(got) == sorted(str(a) for a in expected)
    rng = np.random.default_rng([0, T])  # the run's draws: per window, n indices with repeats
    per_image = ranked.pivot_table(index="target", columns="image", values="degradation_pct")
    boot = []
    for _ in range(resamples):
        draw = rng.integers(0, len(images), len(images))
        weights = np.bincount(draw, minlength=len(images))
        scores_b = {
            registry.parse(t): float(np.average(row, weights=weights))
            for t, row in per_image.iterrows()
        }
        boot.append(_galloping(plain, scores_b, PRIMARY_TAU, draw))
    assert c.boot_sizes == [len(b) for b in boot]
    assert c.selection_frequency == {
        str(a): f for a in registry if (f := np.mean([a in b for b in boot])) > 0
    }
    assert cost.forward_calls < plain.forwards / 3  # the plain searches ran one set per forward


class _Countable:
    """A loss given as a function of the head set, with the stacking protocol: ``known``, and ``prefetch`` counting
    the batches of sets asked for together."""

    method, metric = "mean", "eps"

    def __init__(self, heads, f):
        self.heads, self.f, self.memo, self.batches, self.evaluated = list(heads), f, {}, 0, 0

    def known(self, s):
        return frozenset(s) in self.memo

    def prefetch(self, sets):
        new = {frozenset(s) for s in sets} - set(self.memo)
        self.batches += bool(new)
        for s in new:
            self.memo[s], self.evaluated = self.f(s), self.evaluated + 1

    def __call__(self, s):
        if not self.known(s):
            self.prefetch([s])
        return self.memo[frozenset(s)]


@pytest.mark.parametrize("seed", range(6))
def test_lookahead_changes_the_cost_of_a_search_never_its_result(seed):
    rng = np.random.default_rng(seed)
    heads = [f"l:{i}" for i in range(40)]
    w = dict(zip(heads, rng.exponential(0.02, 40) * np.where(rng.random(40) < 0.3, 1.0, 0.05)))
    pairs = [
        (heads[i], heads[j], rng.normal(0, 0.01)) for i, j in rng.integers(0, 40, (40, 2)) if i != j
    ]

    def f(s):  # non-monotone: pairwise terms of either sign
        return 1 + sum(w[a] for a in s) + sum(v for a, b, v in pairs if a in s and b in s)

    importance = {a: 100 * v for a, v in w.items()}  # % of the full model's loss (L_full = 1)
    plain = _Countable(heads, f)
    results = {
        d: (prune_heads(loss := _Countable(heads, f), importance, 0.05, lookahead=d), loss.batches)
        for d in (1, 3, 8)
    }
    assert {r for r, _ in results.values()} == {prune_heads(plain, importance, 0.05)}
    assert results[8][1] < results[1][1]  # fewer rounds of evaluations


def test_lockstep_returns_what_each_job_returns_alone(embedded):
    den, images, registry = embedded
    heads = list(registry)
    importance = {a: float(k) for k, a in enumerate(heads)}
    alone = CircuitLoss(den, images, timesteps=[T], registry=registry)
    shared = CircuitLoss(den, images, timesteps=[T], registry=registry)
    draws = [[0, 0, 1, 2, 3, 3], [5, 4, 4, 1, 1, 0]]
    expected = [prune_circuit(alone, importance, 0.1).heads] + [
        prune_heads(alone.resampled(d), importance, 0.1) for d in draws
    ]
    with count_forwards(den.network) as cost:
        got = lockstep(
            [(lambda v: prune_circuit(v, importance, 0.1).heads, shared)]
            + [(lambda v: prune_heads(v, importance, 0.1), shared.resampled(d)) for d in draws]
        )
    assert got == expected and cost.forward_calls < alone.evaluations
