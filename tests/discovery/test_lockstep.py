"""The discovery engine: stacked, memoised circuit losses and searches run in lockstep.

References: one head set per plain forward (the session's per-head ``patches``, means from a plain
cached forward), a copy of the one-search-at-a-time galloping pruning run on that plain loss, and
forward counts from ``count_forwards``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffcircuit import load_denoiser, load_images, probe_registry
from diffcircuit.discovery.circuits import CircuitLoss, passes_tau, prune_circuit, prune_heads
from diffcircuit.discovery.lockstep import lockstep
from diffcircuit.instrument.cost import count_forwards
from diffcircuit.instrument.session import instrument
from diffcircuit.interventions.ablation import targets
from diffcircuit.interventions.sweep import ablation_sweep
from diffcircuit.models.diffusion import eps_mse_per_image
from diffcircuit.models.noise import noisy_batch
from diffcircuit.protocol.circuits import PRIMARY_TAU, discover_circuits, importance_rows

T = 300


class _PlainLoss:
    """L(S) the plain way: per timestep one forward over all images with S's heads patched to their in-sample means
    (taken from a plain cached forward), ε-MSE per image against each image's noise; memoised by set only."""

    def __init__(self, den, images, registry, timesteps, method="mean", dataset="a"):
        self.den, self.registry, self.method, self.metric = den, registry, method, "eps"
        self.heads, self.n_images = list(registry), len(images)
        x0 = torch.from_numpy(np.asarray(images, dtype=np.float32))
        self.batches = [
            noisy_batch(den, x0, np.arange(len(x0)), t, seed=0, dataset=dataset) for t in timesteps
        ]
        self.means = []
        for b in self.batches:
            with (
                torch.no_grad(),
                instrument(
                    den, registry=registry, cache_heads=[i.layer for i in registry.layers]
                ) as s,
            ):
                den.predict(b.x_t, b.t, rows=b.which)
            self.means.append(
                {layer: out.mean(0) for layer, out in s.pop("head_out").items()}
            )  # [heads, q, d]
        self.memo, self.forwards = {}, 0

    def per_image(self, ablated) -> np.ndarray:
        key = frozenset(ablated)
        if key not in self.memo:
            total = np.zeros(self.n_images)
            for b, means in zip(self.batches, self.means):
                patches = {
                    a: (means[a.layer][a.head] if self.method == "mean" else 0.0) for a in key
                }
                with torch.no_grad(), instrument(self.den, registry=self.registry, patches=patches):
                    eps_hat = self.den.predict_eps(b.x_t, b.t, rows=b.which)
                total += eps_mse_per_image(eps_hat, b.eps).double().numpy()
                self.forwards += 1
            self.memo[key] = total / len(self.batches)
        return self.memo[key]

    def __call__(self, ablated) -> float:
        return float(self.per_image(ablated).mean())


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
def embedded():
    den = load_denoiser()
    images = load_images("faces", n=6, size=32, channels=3).images
    registry = probe_registry(den, torch.from_numpy(images[:1]), torch.zeros(1, dtype=torch.long))
    return den, images, registry


def _some_sets(registry, seed=0):
    rng = np.random.default_rng(seed)
    heads = list(registry)
    picks = [
        [heads[j] for j in rng.choice(len(heads), min(k, len(heads) - 1), replace=False)]
        for k in (1, 3, 9, 30)
    ]
    return [[], heads, [heads[-1]], *picks]


@pytest.mark.parametrize("method", ["mean", "zero"])
def test_stacked_losses_equal_one_set_per_plain_forward_on_the_unet(embedded, method):
    """Many sets on a window of two timesteps and on overlapping image subsets, several sets to a forward and a set
    completed on images it lacked, equal each set's own plain forwards to 1e-5."""
    den, images, registry = embedded
    sets = _some_sets(registry)
    plain = _PlainLoss(den, images, registry, [T, 700], method=method)
    loss = CircuitLoss(
        den, images, timesteps=[T, 700], registry=registry, method=method, stack_rows=10
    )
    with count_forwards(den.network) as cost:
        loss.prefetch(sets[:4], images=[0, 2, 5])  # a resample's distinct images first
        first = cost.image_forwards
        loss.prefetch(sets)  # then everything: the first sets only on the images they lack
    # the empty set ran in the clean forward that gave the in-sample means; every other (set, timestep, image) once
    assert (first, cost.image_forwards) == (2 * 3 * 3, 2 * 6 * 6)
    assert cost.forward_calls == -(-first // 10) + -(
        -(cost.image_forwards - first) // 10
    )  # 10 rows a forward
    for s in sets:
        np.testing.assert_allclose(loss.per_image(s), plain.per_image(s), rtol=1e-5, atol=1e-8)
    assert loss.evaluations == len(sets)


@pytest.mark.parametrize("family", ["sd3", "flux", "dit", "pixart-captioned"])
def test_stacked_losses_equal_one_set_per_plain_forward_on_transformers(
    family, sd3_folder, flux_folder, tmp_path, request, captioned_folder
):
    """The same on transformer families; with PixArt, each image of a captioned dataset keeps its own caption in
    every variant's copy of the rows."""
    from diffcircuit.models.latent import model_images
    from tests.interventions.test_ablation import _transformer

    dataset = "a"
    if family == "pixart-captioned":
        from diffcircuit.models.loading import load_conditioned, use_captions

        den = load_conditioned(str(request.getfixturevalue("pixart_text_folder")))
        folder = captioned_folder(
            tmp_path / "pairs", {"0.png": "a", "1.png": "bcdef", "2.png": "gh"}
        )
        found = model_images(den, str(folder), n=3)
        dataset = "b"
        assert use_captions(den, dataset, found.captions) == "each image's own caption"
    else:
        den = _transformer(family, sd3_folder, flux_folder, tmp_path)
        found = model_images(den, "synthetic", n=3)
    images = np.asarray(found.images, dtype=np.float32)
    registry = probe_registry(den, torch.from_numpy(images[:1]), torch.zeros(1, dtype=torch.long))
    sets = _some_sets(registry)
    plain = _PlainLoss(den, images, registry, [T], dataset=dataset)
    loss = CircuitLoss(den, images, timesteps=[T], registry=registry, stack_rows=7, dataset=dataset)
    loss.prefetch(sets[2:], images=[1])
    loss.prefetch(sets)
    for s in sets:
        np.testing.assert_allclose(loss.per_image(s), plain.per_image(s), rtol=1e-5, atol=1e-8)


def test_memo_hits_cost_no_forward_and_a_set_is_completed_not_recomputed(embedded):
    den, images, registry = embedded
    loss = CircuitLoss(den, images, timesteps=[T], registry=registry)
    s = list(registry)[:5]
    loss.per_image([])  # the clean forward
    with count_forwards(den.network) as first:
        loss.resampled([1, 1, 3, 4, 4, 4])(s)
    with count_forwards(den.network) as completion:
        loss.resampled([0, 1, 2, 3, 3, 0])(s)  # images 0 and 2 are new
        loss(s)  # and image 5
    with count_forwards(den.network) as hits:
        (
            loss(s),
            loss.per_image(s, [4, 0]),
            loss.resampled([2, 2, 2, 2, 2, 5])(s),
            loss.prefetch([s, []]),
        )
    assert (first.forward_calls, first.image_forwards) == (1, 3)
    assert (completion.forward_calls, completion.image_forwards) == (2, 3)
    assert hits.forward_calls == 0 and loss.evaluations == 2


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
def test_lockstep_discovery_finds_the_circuits_of_one_search_at_a_time(embedded, ranked, lookahead):
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
    plain = _PlainLoss(den, images, registry, [T])
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
    assert c["boot_sizes"] == [len(b) for b in boot]
    assert c["selection_frequency"] == {
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
