"""Circuit discovery on planted copies of the embedded (trained) model.

Dead heads: their output-projection columns are zeroed, so they cannot matter; discovery must rank
them last and never select them. Essential head: in the attention layer whose mean ablation costs the
trained model most, every other head is zeroed, so the whole layer's attention flows through one
head; discovery must select it.
"""

from __future__ import annotations

import copy

import pytest
import torch

from diffcircuit import load_denoiser, load_images, probe_registry
from diffcircuit.discovery.circuits import CircuitLoss, grow_circuit, prune_circuit, ranking_auc
from diffcircuit.instrument.registry import attention_modules
from diffcircuit.interventions.ablation import Target, targets
from diffcircuit.interventions.sweep import ablation_sweep
from diffcircuit.models.loading import Denoiser

DEAD = ["down_blocks.1.attentions.0:1", "mid_block.attentions.0:0", "up_blocks.0.attentions.1:3",
        "up_blocks.1.attentions.0:5", "down_blocks.2.attentions.0:7"]
ESSENTIAL_HEAD = 2
T, TAU = 300, 0.02


def _zero_heads(net, addresses):
    layers = dict(attention_modules(net))
    with torch.no_grad():
        for address in addresses:
            layer, head = address.rsplit(":", 1)
            attn, h = layers[layer], int(head)
            d = attn.inner_dim // attn.heads
            attn.to_out[0].weight[:, h * d:(h + 1) * d] = 0


@pytest.fixture(scope="module")
def planted():
    base = load_denoiser()
    images = load_images("faces", n=16, size=32, channels=3).images
    registry = probe_registry(base.network, torch.from_numpy(images[:1]), torch.zeros(1, dtype=torch.long))
    layers = ablation_sweep(base, images, targets=targets(registry, "layer"), methods=["mean"], timesteps=[T],
                            registry=registry).groupby("target").degradation_pct.mean()
    layer = layers.idxmax()
    assert layers.max() > 200 * TAU  # the chosen layer matters: its loss increase (%) is far above τ
    essential = f"{layer}:{ESSENTIAL_HEAD}"
    net = copy.deepcopy(base.network)
    heads = dict(attention_modules(net))[layer].heads
    dead = [a for a in DEAD if not a.startswith(layer + ":")]
    _zero_heads(net, dead + [f"{layer}:{h}" for h in range(heads) if h != ESSENTIAL_HEAD])
    den = Denoiser(network=net, scheduler=base.scheduler, model_path=base.model_path, source="planted")
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


@pytest.mark.parametrize("search", [prune_circuit, grow_circuit])
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
