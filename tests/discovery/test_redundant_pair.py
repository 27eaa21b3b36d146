"""Planted redundancy: two heads that duplicate each other, checked against discovery and necessity.

In the attention layer whose mean ablation costs the trained model most, head b is overwritten with
a copy of the layer's most important head a and both outputs are halved; every other head of the
model is made dead, so the pair is the model's only live computation and the gap L_empty − L_full
is what removing both costs. The test's τ lies between what either alone costs and what both cost
(both measured by the independent ablation sweep): either can go, not both.
"""

from __future__ import annotations

import math

import pytest
import torch

from diffcircuit import Denoiser, load_denoiser, load_images, probe_registry
from diffcircuit.discovery.circuits import CircuitLoss, grow_circuit, necessary_heads, prune_circuit
from diffcircuit.discovery.planted import duplicate_head, plant, zero_heads
from diffcircuit.interventions.ablation import Target, targets
from diffcircuit.interventions.sweep import ablation_sweep

T = 300


def _sweep(den, images, registry, heads: dict[str, tuple]):
    plan = [
        Target(level="random", name=name, heads=tuple(registry.parse(h) for h in hs))
        for name, hs in heads.items()
    ]
    rows = ablation_sweep(
        den, images, targets=plan, methods=["mean"], timesteps=[T], registry=registry
    )
    return rows.groupby("target").mse_intervened.mean(), rows.mse_clean.mean()


@pytest.fixture(scope="module")
def pair_model():
    base = load_denoiser()
    images = load_images("faces", n=8, size=32, channels=3).images
    registry = probe_registry(
        base.network, torch.from_numpy(images[:1]), torch.zeros(1, dtype=torch.long)
    )
    layer = (
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
        .idxmax()
    )
    heads = (
        ablation_sweep(
            base,
            images,
            targets=[t for t in targets(registry, "head") if t.name.startswith(layer + ":")],
            methods=["mean"],
            timesteps=[T],
            registry=registry,
        )
        .groupby("target")
        .degradation_pct.mean()
    )
    a, b = (int(heads.idxmax().rsplit(":", 1)[1]), int(heads.idxmin().rsplit(":", 1)[1]))
    pair = (f"{layer}:{a}", f"{layer}:{b}")
    planted = plant(
        base.network, dead=[str(h) for h in registry if str(h) not in pair], redundant=(layer, a, b)
    )
    den = Denoiser(
        network=planted.network,
        scheduler=base.scheduler,
        model_path=base.model_path,
        source="planted",
    )
    loss, clean = _sweep(den, images, registry, {"a": (pair[0],), "b": (pair[1],), "both": pair})
    cost = {k: (v - clean) / (loss["both"] - clean) for k, v in loss.items()}  # shares of the gap
    tau = math.sqrt(
        max(cost["a"], cost["b"]) * cost["both"]
    )  # between either alone and both together
    importance = {
        registry.parse(t): v
        for t, v in ablation_sweep(
            den,
            images,
            targets=targets(registry, "head"),
            methods=["mean"],
            timesteps=[T],
            registry=registry,
        )
        .groupby("target")
        .degradation_pct.mean()
        .items()
    }
    return dict(
        base=base,
        den=den,
        images=images,
        registry=registry,
        pair=tuple(registry.parse(h) for h in pair),
        dead={registry.parse(h) for h in planted.dead},
        cost=cost,
        tau=tau,
        importance=importance,
    )


def test_a_duplicated_head_computes_what_the_original_head_computed_alone(pair_model):
    """The pair's layer output equals the layer with head a at full weight and head b dead (plain forward)."""
    import copy

    base, (a, b) = pair_model["base"].network, pair_model["pair"]
    dup, alone = copy.deepcopy(base), copy.deepcopy(base)
    duplicate_head(dup, a.layer, a.head, b.head)
    zero_heads(alone, [str(b)])
    x, t = torch.from_numpy(pair_model["images"][:4]), torch.full((4,), T)
    with torch.no_grad():
        torch.testing.assert_close(dup(x, t).sample, alone(x, t).sample, atol=1e-5, rtol=1e-5)


def test_either_head_alone_costs_much_less_than_both(pair_model):
    cost = pair_model["cost"]
    assert cost["a"] == pytest.approx(cost["b"], abs=1e-3)  # duplicates
    assert cost["both"] == pytest.approx(
        1.0
    )  # the pair is the only live computation: both = every head
    assert (
        max(cost["a"], cost["b"]) < 0.6 * cost["both"]
    )  # halving a signal costs far less than removing it
    assert (
        max(cost["a"], cost["b"]) < pair_model["tau"] / 1.2
        and pair_model["tau"] < cost["both"] / 1.2
    )  # margins


@pytest.mark.parametrize("search", ["grouped", "sequential", "grow"])
def test_discovery_keeps_exactly_one_of_a_redundant_pair_and_no_dead_head(pair_model, search):
    m = pair_model
    loss = CircuitLoss(m["den"], m["images"], timesteps=[T], registry=m["registry"])
    circuit = (
        grow_circuit(loss, m["importance"], m["tau"])
        if search == "grow"
        else prune_circuit(loss, m["importance"], m["tau"], search=search)
    )
    assert len(set(circuit.heads) & set(m["pair"])) == 1
    assert not set(circuit.heads) & m["dead"]
    assert circuit.faithfulness >= 1 - m["tau"]


def test_necessity_reveals_the_redundancy(pair_model):
    m = pair_model
    loss = CircuitLoss(m["den"], m["images"], timesteps=[T], registry=m["registry"])
    circuit = prune_circuit(loss, m["importance"], m["tau"])
    # the one kept head is necessary: ablating it on top of everything else removes both copies
    assert necessary_heads(loss, circuit.heads, m["tau"]) == circuit.heads
    # with both kept, neither is individually necessary, yet the two together are: redundancy, not irrelevance
    both = tuple(sorted({*circuit.heads, *m["pair"]}))
    assert necessary_heads(loss, both, m["tau"]) == ()
    outside = [h for h in loss.heads if h not in both]
    full, empty = loss([]), loss(loss.heads)
    assert loss([*outside, *m["pair"]]) - full > m["tau"] * (empty - full)
