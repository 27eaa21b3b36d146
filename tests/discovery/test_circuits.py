"""Circuit discovery on planted copies of the embedded (trained) model.

Dead heads: their output-projection columns are zeroed, so they cannot matter; discovery must rank
them last and never select them. Essential head: in the attention layer whose mean ablation costs the
trained model most, every other head is zeroed, so the whole layer's attention flows through one
head; discovery must select it.
"""

from __future__ import annotations


import pytest
import torch

from diffcircuit import load_denoiser, load_images, probe_registry
from diffcircuit.discovery.circuits import CircuitLoss, grow_circuit, prune_circuit, ranking_auc
from diffcircuit.discovery.planted import plant
from diffcircuit.interventions.ablation import Target, targets
from diffcircuit.interventions.sweep import ablation_sweep
from diffcircuit.models.loading import Denoiser

DEAD = ["down_blocks.1.attentions.0:1", "mid_block.attentions.0:0", "up_blocks.0.attentions.1:3",
        "up_blocks.1.attentions.0:5", "down_blocks.2.attentions.0:7"]
ESSENTIAL_HEAD = 2
T, TAU = 300, 0.02


@pytest.fixture(scope="module")
def planted():
    base = load_denoiser()
    images = load_images("faces", n=16, size=32, channels=3).images
    registry = probe_registry(base.network, torch.from_numpy(images[:1]), torch.zeros(1, dtype=torch.long))
    layers = ablation_sweep(base, images, targets=targets(registry, "layer"), methods=["mean"], timesteps=[T],
                            registry=registry).groupby("target").degradation_pct.mean()
    layer = layers.idxmax()
    assert layers.max() > 200 * TAU  # the chosen layer matters: its loss increase (%) is far above τ
    planted_model = plant(base.network, dead=DEAD, essential_layer=layer, essential_head=ESSENTIAL_HEAD)
    dead, essential = list(planted_model.dead), planted_model.essential
    den = Denoiser(network=planted_model.network, scheduler=base.scheduler, model_path=base.model_path, source="planted")
    table = ablation_sweep(den, images, targets=targets(registry, "head"), methods=["mean"], timesteps=[T], registry=registry)
    importance = {registry.parse(t): v for t, v in table.groupby("target").degradation_pct.mean().items()}
    return den, images, registry, importance, dead, essential


def test_dead_heads_rank_last(planted):
    _, _, registry, importance, dead, _ = planted
    dead = {registry.parse(a) for a in dead}
    assert all(importance[a] == 0 for a in dead)
    live = {a for a in importance if a not in dead and abs(importance[a]) > 0}
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
    assert (circuit.loss_circuit - circuit.loss_full) / circuit.loss_full <= TAU + 1e-9
    # faithfulness re-measured independently, by the sweep ablating everything outside the circuit
    outside = tuple(a for a in registry if a not in circuit.heads)
    rows = ablation_sweep(den, images, targets=[Target(level="random", name="outside", heads=outside)],
                          methods=["mean"], timesteps=[T], registry=registry)
    expected = (circuit.loss_empty - rows.mse_intervened.mean()) / (circuit.loss_empty - circuit.loss_full)
    assert circuit.faithfulness == pytest.approx(expected, rel=1e-4)


class _MonotoneLoss:
    """A stand-in for CircuitLoss: L(S) = 1 + Σ w_h + Σ pairwise interactions ≥ 0 over S (monotone in S).

    ``important`` of the heads carry most of the loss, as in a real model's few critical heads.
    """

    method = "mean"

    def __init__(self, n, seed, important=0.2):
        import numpy as np

        rng = np.random.default_rng(seed)
        self.heads = [f"l:{i}" for i in range(n)]
        self.w = dict(zip(self.heads, rng.exponential(0.01, n) * np.where(rng.random(n) < important, 1.0, 0.02)))
        self.pair = {(a, b): rng.exponential(0.002) for a in self.heads for b in self.heads if a < b and rng.random() < 0.01}
        self.evaluations = 0

    def __call__(self, ablated):
        self.evaluations += 1
        s = set(ablated)
        return 1 + sum(self.w[a] for a in s) + sum(v for (a, b), v in self.pair.items() if a in s and b in s)


def _both_searches(n, seed, important, tau):
    import numpy as np

    grouped, sequential = _MonotoneLoss(n, seed, important), _MonotoneLoss(n, seed, important)
    noise = np.random.default_rng(100 + seed).normal(0, 0.003, n)
    importance = {a: grouped.w[a] + e for a, e in zip(grouped.heads, noise)}  # an imperfect ranking
    return (prune_circuit(grouped, importance, tau), prune_circuit(sequential, importance, tau, search="sequential"),
            grouped.evaluations, sequential.evaluations)


@pytest.mark.parametrize("important", [0.1, 0.5])
@pytest.mark.parametrize("seed", range(10))
def test_grouped_pruning_equals_one_at_a_time_when_the_loss_is_monotone(seed, important):
    a, b, _, _ = _both_searches(40, seed, important, 0.02)
    assert a.heads == b.heads and a.loss_circuit == b.loss_circuit


def test_grouped_pruning_needs_fewer_evaluations_when_few_heads_matter():
    counts = [_both_searches(72, seed, 0.1, 0.05)[2:] for seed in range(10)]
    grouped, sequential = map(sum, zip(*counts))
    assert grouped < 0.6 * sequential, (grouped, sequential)


def test_circuit_curve_runs_from_nothing_recovered_to_everything():
    from diffcircuit.discovery.circuits import circuit_curve, curve_sizes

    loss = _MonotoneLoss(30, 0)
    curve = circuit_curve(loss, dict(loss.w))
    assert [c["size"] for c in curve] == curve_sizes(30) and curve_sizes(30)[:5] == [0, 1, 2, 3, 4]
    assert curve[0]["faithfulness"] == pytest.approx(0) and curve[0]["completeness"] == pytest.approx(1)
    assert curve[-1]["faithfulness"] == pytest.approx(1) and curve[-1]["completeness"] == pytest.approx(0)
    # by hand for k = 3: the three heads with the largest weights kept, everything else ablated
    top = sorted(loss.heads, key=lambda a: (-loss.w[a], a))[:3]
    full, empty = loss([]), loss(loss.heads)
    row = next(c for c in curve if c["size"] == 3)
    assert row["faithfulness"] == pytest.approx((empty - loss([a for a in loss.heads if a not in top])) / (empty - full))


def test_planting_edits_a_copy_and_leaves_one_live_head_in_the_essential_layer(small_unet):
    from diffcircuit.instrument.registry import attention_modules

    before = {k: v.clone() for k, v in small_unet.state_dict().items()}
    layer = "down_blocks.1.attentions.0"
    p = plant(small_unet, dead=["down_blocks.0.attentions.0:1", f"{layer}:0"], essential_layer=layer, essential_head=2)
    assert all(torch.equal(before[k], v) for k, v in small_unet.state_dict().items())  # the original is untouched
    assert p.dead == ("down_blocks.0.attentions.0:1",) and p.essential == f"{layer}:2"
    attn = dict(attention_modules(p.network))[layer]
    d = attn.inner_dim // attn.heads
    w = attn.to_out[0].weight
    live = [h for h in range(attn.heads) if w[:, h * d:(h + 1) * d].abs().sum() > 0]
    assert live == [2]
    dead_attn = dict(attention_modules(p.network))["down_blocks.0.attentions.0"]
    assert dead_attn.to_out[0].weight[:, d:2 * d].abs().sum() == 0


def test_jaccard_is_undefined_for_two_empty_circuits():
    import math

    from diffcircuit.discovery.circuits import jaccard

    assert math.isnan(jaccard([], []))
    assert jaccard(["l:1"], ["l:1", "l:2"]) == 0.5 and jaccard(["l:1"], []) == 0.0
