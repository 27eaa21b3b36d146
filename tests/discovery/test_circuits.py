"""Circuit discovery on planted copies of the embedded (trained) model.

Dead heads: their output-projection columns are zeroed, so they cannot matter; discovery must rank
them last and never select them. Essential head: in the attention layer whose mean ablation costs the
trained model most, every other head is zeroed, so the whole layer's attention flows through one
head; discovery must select it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffcircuit import Denoiser, load_denoiser, load_images, probe_registry
from diffcircuit.discovery.circuits import CircuitLoss, grow_circuit, prune_circuit, ranking_auc
from diffcircuit.discovery.planted import plant
from diffcircuit.interventions import Target, ablation_sweep, targets

DEAD = [
    "down_blocks.1.attentions.0:1",
    "mid_block.attentions.0:0",
    "up_blocks.0.attentions.1:3",
    "up_blocks.1.attentions.0:5",
    "down_blocks.2.attentions.0:7",
]
ESSENTIAL_HEAD = 2
T, TAU = 300, 0.02


@pytest.fixture(scope="module")
def planted():
    base = load_denoiser()
    images = load_images("faces", n=16, size=32, channels=3).images
    registry = probe_registry(
        base.network, torch.from_numpy(images[:1]), torch.zeros(1, dtype=torch.long)
    )
    layers = (
        ablation_sweep(
            base,
            images,
            targets=targets(registry, "layer"),
            methods=["mean"],
            timesteps=[T],
            registry=registry,
        )
        .groupby("target")
        .degradation_pct.mean()
    )
    layer = layers.idxmax()
    assert (
        layers.max() > 200 * TAU
    )  # the chosen layer matters: its loss increase (%) is far above τ
    planted_model = plant(
        base.network, dead=DEAD, essential_layer=layer, essential_head=ESSENTIAL_HEAD
    )
    dead, essential = list(planted_model.dead), planted_model.essential
    den = Denoiser(
        network=planted_model.network,
        scheduler=base.scheduler,
        model_path=base.model_path,
        source="planted",
    )
    table = ablation_sweep(
        den,
        images,
        targets=targets(registry, "head"),
        methods=["mean"],
        timesteps=[T],
        registry=registry,
    )
    importance = {
        registry.parse(t): v for t, v in table.groupby("target").degradation_pct.mean().items()
    }
    return den, images, registry, importance, dead, essential


def test_dead_heads_rank_last(planted):
    _, _, registry, importance, dead, _ = planted
    dead = {registry.parse(a) for a in dead}
    # zero up to float rounding: stacked variants run at another batch shape than the clean forward
    assert all(abs(importance[a]) < 1e-4 for a in dead)  # percent of the clean loss
    live = {a for a in importance if a not in dead and abs(importance[a]) > 1e-3}
    magnitude = {a: abs(v) for a, v in importance.items()}
    assert ranking_auc({a: magnitude[a] for a in live | dead}, live) == 1.0


def _sequential_prune(loss, importance, tau):
    return prune_circuit(loss, importance, tau, search="sequential")


@pytest.mark.parametrize("search", [prune_circuit, _sequential_prune, grow_circuit])
def test_discovery_selects_the_essential_head_and_no_dead_one(planted, search):
    den, images, registry, importance, dead, essential = planted
    loss = CircuitLoss(den, images, timesteps=[T], registry=registry)
    circuit = search(loss, importance, TAU)
    assert registry.parse(essential) in circuit.heads
    assert not {registry.parse(a) for a in dead} & set(circuit.heads)
    # losses and faithfulness re-measured independently, by the sweep ablating everything / everything outside
    outside = tuple(a for a in registry if a not in circuit.heads)
    rows = ablation_sweep(
        den,
        images,
        targets=[
            Target(level="random", name="outside", heads=outside),
            Target(level="random", name="all", heads=tuple(registry)),
        ],
        methods=["mean"],
        timesteps=[T],
        registry=registry,
    ).groupby("target")
    full, empty = rows.mse_clean.mean()["all"], rows.mse_intervened.mean()["all"]
    assert (circuit.loss_full, circuit.loss_empty) == (
        pytest.approx(full, rel=1e-5),
        pytest.approx(empty, rel=1e-5),
    )
    assert rows.mse_intervened.mean()["outside"] - full <= TAU * (empty - full) * (
        1 + 1e-4
    )  # τ is a share of the gap
    expected = (empty - rows.mse_intervened.mean()["outside"]) / (empty - full)
    assert (
        circuit.faithfulness == pytest.approx(expected, rel=1e-4)
        and circuit.faithfulness >= 1 - TAU - 1e-4
    )


class _MonotoneLoss:
    """A stand-in for CircuitLoss: L(S) = 1 + Σ w_h + Σ pairwise interactions ≥ 0 over S (monotone in S).

    ``important`` of the heads carry most of the loss, as in a real model's few critical heads.
    """

    method = "mean"

    def __init__(self, n, seed, important=0.2, minor=0.02):
        import numpy as np

        rng = np.random.default_rng(seed)
        self.heads = [f"l:{i}" for i in range(n)]
        self.w = dict(
            zip(
                self.heads,
                rng.exponential(0.01, n) * np.where(rng.random(n) < important, 1.0, minor),
            )
        )
        self.pair = {
            (a, b): rng.exponential(0.1 * minor)
            for a in self.heads
            for b in self.heads
            if a < b and rng.random() < 0.01
        }
        self.evaluations = 0

    def __call__(self, ablated):
        self.evaluations += 1
        s = set(ablated)
        return (
            1
            + sum(self.w[a] for a in s)
            + sum(v for (a, b), v in self.pair.items() if a in s and b in s)
        )


def _both_searches(n, seed, important, tau, minor=0.02):
    import numpy as np

    grouped, sequential = (
        _MonotoneLoss(n, seed, important, minor),
        _MonotoneLoss(n, seed, important, minor),
    )
    noise = np.random.default_rng(100 + seed).normal(0, 0.003, n)
    importance = {a: grouped.w[a] + e for a, e in zip(grouped.heads, noise)}  # an imperfect ranking
    return (
        prune_circuit(grouped, importance, tau),
        prune_circuit(sequential, importance, tau, search="sequential"),
        grouped.evaluations,
        sequential.evaluations,
    )


@pytest.mark.parametrize("important", [0.1, 0.5])
@pytest.mark.parametrize("seed", range(10))
def test_grouped_pruning_equals_one_at_a_time_when_the_loss_is_monotone(seed, important):
    a, b, _, _ = _both_searches(40, seed, important, 0.02)
    assert a.heads == b.heads and a.loss_circuit == b.loss_circuit


def test_grouped_pruning_needs_fewer_evaluations_when_few_heads_matter():
    # the unimportant heads together cost well under τ of the gap, as in a model with a few critical heads
    counts = [_both_searches(72, seed, 0.1, 0.05, minor=0.0001)[2:] for seed in range(10)]
    grouped, sequential = map(sum, zip(*counts))
    assert grouped < 0.6 * sequential, (grouped, sequential)


def test_circuit_curve_runs_from_nothing_recovered_to_everything():
    from diffcircuit.discovery.circuits import circuit_curve, curve_sizes

    loss = _MonotoneLoss(30, 0)
    curve = circuit_curve(loss, dict(loss.w))
    assert [c["size"] for c in curve] == curve_sizes(30) and curve_sizes(30)[:5] == [0, 1, 2, 3, 4]
    assert curve[0]["faithfulness"] == pytest.approx(0) and curve[0][
        "recovered_without_circuit"
    ] == pytest.approx(1)
    assert curve[-1]["faithfulness"] == pytest.approx(1) and curve[-1][
        "recovered_without_circuit"
    ] == pytest.approx(0)
    # by hand for k = 3: the three heads with the largest weights kept, everything else ablated
    top = sorted(loss.heads, key=lambda a: (-loss.w[a], a))[:3]
    full, empty = loss([]), loss(loss.heads)
    row = next(c for c in curve if c["size"] == 3)
    assert row["faithfulness"] == pytest.approx(
        (empty - loss([a for a in loss.heads if a not in top])) / (empty - full)
    )
    assert row["recovered_without_circuit"] == pytest.approx((empty - loss(top)) / (empty - full))


def test_jaccard_is_undefined_for_two_empty_circuits():
    import math

    from diffcircuit.discovery.circuits import jaccard

    assert math.isnan(jaccard([], []))
    assert jaccard(["l:1"], ["l:1", "l:2"]) == 0.5 and jaccard(["l:1"], []) == 0.0


class _FunctionLoss:
    """A stand-in for CircuitLoss over named heads: L(S) = ``f(set(S))``, counting evaluations."""

    method, metric = "mean", "eps"

    def __init__(self, heads, f):
        self.heads, self.f, self.evaluations = list(heads), f, 0

    def __call__(self, ablated):
        self.evaluations += 1
        return self.f(set(ablated))


def test_tau_is_a_share_of_the_gap_not_of_the_full_models_loss():
    # additive loss, L_full = 1, gap = 0.1: τ = 0.05 allows 0.005 (not 0.05 = 5 % of L_full)
    w = {"l:0": 0.001, "l:1": 0.002, "l:2": 0.01, "l:3": 0.087}
    loss = _FunctionLoss(w, lambda s: 1 + sum(w[a] for a in s))
    for search in ("grouped", "sequential"):
        c = prune_circuit(loss, w, 0.05, search=search)
        assert c.heads == (
            "l:2",
            "l:3",
        )  # by hand: removing l:0 and l:1 costs 0.003 ≤ 0.005; l:2 would cost 0.013
        assert c.gap == pytest.approx(0.1) and c.faithfulness == pytest.approx(0.97)
    assert grow_circuit(loss, w, 0.05).heads == ("l:2", "l:3")
    assert prune_circuit(loss, w, 0.2).heads == ("l:3",)  # 0.2 of the gap = 0.02 ≥ 0.013


def test_no_positive_gap_gives_the_empty_circuit_and_no_faithfulness():
    import math

    heads = [f"l:{i}" for i in range(5)]
    loss = _FunctionLoss(heads, lambda s: 1 - 0.01 * len(s))  # ablating heads only helps
    c = prune_circuit(loss, dict.fromkeys(heads, 0.0), 0.05)
    assert (
        c.heads == ()
        and c.gap < 0
        and math.isnan(c.faithfulness)
        and math.isnan(c.recovered_without_circuit)
    )


def _compensating_loss(s):
    """Non-monotone: removing l:1 costs 0.5 unless l:2 is removed with it; l:3 carries the rest."""
    return (1.0 if "l:3" in s else 0.0) + (0.5 if "l:1" in s and "l:2" not in s else 0.0)


def test_grouped_and_one_at_a_time_pruning_differ_where_the_loss_is_not_monotone():
    from diffcircuit.discovery.circuits import passes_tau

    heads = ["l:0", "l:1", "l:2", "l:3"]
    importance = {
        h: float(i) for i, h in enumerate(heads)
    }  # pruned in the order l:0, l:1, l:2, l:3
    assert _compensating_loss({"l:0", "l:1", "l:2"}) < _compensating_loss(
        {"l:0", "l:1"}
    )  # not monotone
    grouped = prune_circuit(_FunctionLoss(heads, _compensating_loss), importance, 0.1)
    sequential = prune_circuit(
        _FunctionLoss(heads, _compensating_loss), importance, 0.1, search="sequential"
    )
    # by hand: one at a time, l:0 goes, l:1 fails alone (0.5 > 0.1), l:2 goes, l:3 fails; grouped, l:0 goes and then
    # the run [l:1, l:2] passes together (loss 0), so only l:3 stays
    assert sequential.heads == ("l:1", "l:3") and grouped.heads == ("l:3",)
    for c in (grouped, sequential):  # both keep the documented guarantee: the circuit passes τ
        assert passes_tau(c.loss_circuit, c.loss_full, c.loss_empty, 0.1)


@pytest.mark.parametrize("seed", range(5))
def test_both_searches_pass_tau_on_random_non_monotone_losses(seed):
    import numpy as np

    from diffcircuit.discovery.circuits import passes_tau

    rng = np.random.default_rng(seed)
    heads = [f"l:{i}" for i in range(24)]
    w = dict(zip(heads, rng.exponential(0.02, 24)))
    pairs = [
        (heads[i], heads[j], rng.normal(0, 0.02)) for i, j in rng.integers(0, 24, (30, 2)) if i != j
    ]

    def f(s):  # pairwise terms of either sign: removing a head can lower the loss
        return 1 + sum(w[a] for a in s) + sum(v for a, b, v in pairs if a in s and b in s)

    for search in ("grouped", "sequential"):
        c = prune_circuit(_FunctionLoss(heads, f), w, 0.05, search=search)
        if c.gap > 0:
            assert passes_tau(c.loss_circuit, c.loss_full, c.loss_empty, 0.05)


@pytest.mark.parametrize("seed", range(5))
def test_on_a_monotone_loss_every_head_one_at_a_time_pruning_keeps_is_necessary(seed):
    from diffcircuit.discovery.circuits import necessary_heads

    loss = _MonotoneLoss(40, seed, 0.3)
    c = prune_circuit(loss, dict(loss.w), 0.05, search="sequential")
    necessary = necessary_heads(loss, c.heads, 0.05)
    assert set(necessary) == set(
        c.heads
    )  # each failed removal only got worse as more heads were removed
    full, empty = loss([]), loss(loss.heads)
    outside = [a for a in loss.heads if a not in c.heads]
    for h in c.heads:  # by hand: ablating h on top of everything outside breaks τ
        assert loss([*outside, h]) - full > 0.05 * (empty - full)


def test_a_bootstrap_resample_scores_each_drawn_image_with_its_own_noise_from_one_shared_evaluation(
    planted,
):
    """L_resample(S) = the mean over the drawn images (repeats counted) of each image's loss with S mean-ablated,
    computed here independently: a plain loop that zeroes nothing but patches the heads by hand, image by image
    with that image's own noise; and a second resample asking for the same head set runs no new forward."""
    from diffcircuit import instrument
    from diffcircuit.models import image_noise

    den, images, registry, _, _, _ = planted
    x = images[:6]
    loss = CircuitLoss(den, x, timesteps=[T], registry=registry)
    ablated = [
        registry.parse("mid_block.attentions.0:1"),
        registry.parse("up_blocks.1.attentions.0:2"),
    ]
    draw = [4, 0, 4, 2, 2, 2]
    first, second = loss.resampled(draw), loss.resampled([1, 1, 3, 5, 0, 0])
    got = first(ablated)
    evaluations = loss.evaluations
    second(ablated)
    assert (
        loss.evaluations == evaluations
    )  # shared: the parent evaluated this head set for all its images once

    x0 = torch.from_numpy(x)
    t = torch.full((len(x),), T)
    eps = torch.stack(
        [image_noise(x0.shape[1:], seed=0, dataset="a", image=i, timestep=T) for i in range(len(x))]
    )
    x_t = den.scheduler.add_noise(x0, eps, t)
    with (
        torch.no_grad(),
        instrument(den.network, registry=registry, cache_heads=[a.layer for a in ablated]) as s,
    ):
        den.network(x_t, t)
    acts = s.pop("head_out")
    patches = {
        a: acts[a.layer][:, a.head].mean(0) for a in ablated
    }  # in-sample mean of each head's output
    with torch.no_grad(), instrument(den.network, registry=registry, patches=patches):
        eps_hat = den.eps_hat(den.network(x_t, t).sample, x_t, t)
    per_image = ((eps_hat - eps) ** 2).flatten(1).mean(1).double().numpy()
    assert got == pytest.approx(per_image[draw].mean(), rel=1e-5)


class _PerImageLoss:
    """A stand-in for CircuitLoss with per-image losses: L_i(S) = 1 + Σ_{h ∈ S} w[h][i]."""

    def __init__(self, w: dict[str, np.ndarray]):
        self.w, self.heads = w, list(w)
        self.n_images = len(next(iter(w.values())))

    def per_image(self, ablated, images=None):
        index = np.arange(self.n_images) if images is None else np.asarray(images)
        return 1 + sum((self.w[a][index] for a in ablated), np.zeros(len(index)))


def test_out_of_bag_faithfulness_scores_each_resamples_circuit_on_the_images_it_left_out():
    from diffcircuit.discovery.circuits import out_of_bag_faithfulness, out_of_bag_requests

    # planted: head "a" carries 0.3 of every image's gap, "b" 0.6 and "c" 0.1 (the loss is additive)
    n = 8
    gap = np.linspace(1.0, 2.0, n)
    loss = _PerImageLoss({"a": 0.3 * gap, "b": 0.6 * gap, "c": 0.1 * gap})
    draws = [[0, 0, 1, 2, 3, 3, 4, 5], [7, 6, 6, 5, 4, 4, 4, 1], list(range(n))]
    circuits = [("a", "b"), ("b",), ("a", "b", "c")]
    oob = out_of_bag_faithfulness(loss, draws, circuits, tau=0.05)
    # by hand: the third resample drew every image (not scored); the first keeps 0.9 of each left-out image's
    # gap, the second 0.6, pooled over left-out images {6, 7} and {0, 2, 3}
    left = [[6, 7], [0, 2, 3]]
    kept = [0.9, 0.6]
    pooled = sum(k * gap[i].sum() for k, i in zip(kept, left)) / sum(gap[i].sum() for i in left)
    assert oob.faithfulness == pytest.approx(pooled)
    assert (oob.low, oob.high) == (pytest.approx(0.6), pytest.approx(0.9))
    assert (oob.resamples, oob.scored, oob.empty, oob.passing) == (2, 2, 0, 0.0)
    assert oob.images_left_out == pytest.approx(2.5) and oob.images_scored == 5
    # the evaluations it needs: nothing and everything on all images, each complement on its left-out images
    requests = out_of_bag_requests(loss, draws, circuits)
    assert [(set(s), list(i)) for _, s, i in requests] == [
        (set(), list(range(n))),
        ({"a", "b", "c"}, list(range(n))),
        ({"c"}, [6, 7]),
        ({"a", "c"}, [0, 2, 3]),
    ]


def test_out_of_bag_faithfulness_weighs_each_image_once_and_scores_only_the_drawable_pool():
    from diffcircuit.discovery.circuits import out_of_bag_faithfulness

    loss = _PerImageLoss({"a": np.ones(6)})  # every image's gap is 1, all of it in head "a"
    # image 1 is left out once (by a circuit that keeps "a": 1), images 2 and 3 twice (1, then 0 from the empty
    # circuit): per image 1, 0.5, 0.5, so 2 of 3 (pooling the 5 pairs instead would give 3 of 5)
    oob = out_of_bag_faithfulness(loss, [[0, 0, 0, 0], [0, 1, 1, 1]], [("a",), ()], 0.05, pool=4)
    assert oob.faithfulness == pytest.approx(2 / 3)
    assert (oob.images_scored, oob.images_left_out) == (3, 2.5)  # images 4 and 5 cannot be drawn
    assert (oob.low, oob.high, oob.passing, oob.empty) == (0.0, 1.0, 0.5, 1)


def test_out_of_bag_faithfulness_counts_an_empty_circuit_as_zero_and_needs_a_positive_gap():
    from diffcircuit.discovery.circuits import out_of_bag_faithfulness

    loss = _PerImageLoss({"a": np.array([1.0, 1.0, 1.0, 1.0])})
    oob = out_of_bag_faithfulness(loss, [[0, 0, 1, 1], [2, 2, 3, 3]], [("a",), ()], tau=0.05)
    assert oob.faithfulness == pytest.approx(0.5)  # 1 on {2, 3}, 0 on {0, 1}: the empty circuit
    assert (oob.empty, oob.passing, oob.low, oob.high) == (1, 0.5, 0.0, 1.0)
    helps = _PerImageLoss({"a": np.array([-1.0, -1.0])})  # ablating only helps: no gap to recover
    none = out_of_bag_faithfulness(helps, [[0, 0]], [()], tau=0.05)
    assert none.faithfulness is None and none.scored == 0 and none.resamples == 1
