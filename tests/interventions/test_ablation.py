"""Ablation targets and the ResNet hook (``interventions.ablation``): each level's targets of a small UNet's
registry, worked out by hand from its architecture; aliases of targets naming the same heads; random head sets;
prompt-token targets; and a ResNet block's residual branch replaced, against edited weights.
(Ablations applied and measured: ``test_sweep.py``.)"""

from __future__ import annotations

import copy
import math
from collections import Counter

import pytest
import torch

from diffcircuit import DiffcircuitError, HeadRegistry, probe_registry
from diffcircuit.interventions import Target, random_head_sets, targets
from diffcircuit.interventions.ablation import (
    distinct_targets,
    resnet_blocks,
    resnet_intervention,
    token_target,
)

# the small UNet (tests/conftest.py): attention layers and their heads
LAYERS = {
    "down_blocks.0.attentions.0": 2,
    "down_blocks.1.attentions.0": 4,
    "mid_block.attentions.0": 4,
    "up_blocks.0.attentions.0": 4,
    "up_blocks.0.attentions.1": 4,
    "up_blocks.1.attentions.0": 2,
    "up_blocks.1.attentions.1": 2,
}


@pytest.fixture
def registry(small_unet):
    return probe_registry(small_unet, torch.zeros(1, 3, 16, 16), torch.zeros(1, dtype=torch.long))


def test_each_level_names_its_heads_in_data_flow_order(registry, small_unet):
    heads = targets(registry, "head")
    assert [t.name for t in heads] == [f"{l}:{h}" for l, n in LAYERS.items() for h in range(n)]
    assert all(
        t.heads == (t.heads[0],) and (t.layer, t.head) == (t.heads[0].layer, t.heads[0].head)
        for t in heads
    )
    layers = targets(registry, "layer")
    assert [(t.name, len(t.heads)) for t in layers] == list(LAYERS.items())
    assert all({a.layer for a in t.heads} == {t.name} for t in layers)
    blocks = targets(registry, "block")
    assert [(t.name, len(t.heads)) for t in blocks] == [
        ("down_blocks.0", 2),
        ("down_blocks.1", 4),
        ("mid_block", 4),
        ("up_blocks.0", 8),
        ("up_blocks.1", 4),
    ]
    (every,) = targets(registry, "all")
    assert every.name == "all_heads" and len(every.heads) == sum(LAYERS.values())
    resnets = targets(registry, "resnet", small_unet)
    assert [t.name for t in resnets] == [name for name, _ in resnet_blocks(small_unet)]
    assert len(resnets) == 8  # one a down block, two an up block, two in the mid block
    with pytest.raises(DiffcircuitError, match="need the model"):
        targets(registry, "resnet")
    with pytest.raises(DiffcircuitError, match="unknown ablation level"):
        targets(registry, "neuron")


def test_targets_naming_the_same_heads_are_one_intervention_with_aliases(registry):
    named = [t for level in ("head", "layer", "block") for t in targets(registry, level)]
    kept, aliases = distinct_targets(named)
    # three blocks hold one layer each: they are those layers, named as their aliases
    assert [t.name for t in kept if t.level == "block"] == ["up_blocks.0", "up_blocks.1"]
    assert aliases == {
        "down_blocks.0.attentions.0": ("down_blocks.0",),
        "down_blocks.1.attentions.0": ("down_blocks.1",),
        "mid_block.attentions.0": ("mid_block",),
    }
    assert len(kept) == len(named) - 3
    a, b = targets(registry, "head")[:2]
    same = Target(level="random", name="r", heads=a.heads)  # random sets are never merged
    assert distinct_targets([a, same, b]) == ([a, same, b], {})


def test_random_sets_are_uniform_draws_of_distinct_heads(registry):
    heads = list(registry)
    sets = random_head_sets(registry, 4, 2000, seed=3)
    assert [t.name for t in sets[:2]] == ["random4.0", "random4.1"]
    assert all(t.level == "random" and len(set(t.heads)) == 4 for t in sets)
    assert all(list(t.heads) == sorted(t.heads) for t in sets)
    counts = Counter(a for t in sets for a in t.heads)
    expected = 2000 * 4 / len(heads)  # each head in a set with probability 4/22
    sd = math.sqrt(2000 * (4 / len(heads)) * (1 - 4 / len(heads)))
    assert set(counts) == set(heads) and all(abs(c - expected) < 5 * sd for c in counts.values())
    assert (
        random_head_sets(registry, 4, 5, seed=3) == sets[:5]
    )  # the first sets do not depend on the count
    assert random_head_sets(registry, 4, 5, seed=4) != sets[:5]
    for size in (0, len(heads) + 1):
        with pytest.raises(DiffcircuitError, match="random set needs 1..22 heads"):
            random_head_sets(registry, size, 1)


def test_token_targets_act_on_cross_attention_heads_only(text_unet):
    registry = HeadRegistry.from_model(text_unet(text_dim=8))
    cross = [a for a in registry if registry.layer(a.layer).kind == "cross"]
    assert len(cross) == 32  # four cross-attention layers of eight heads
    removed = token_target(registry, "token:2", n_tokens=5)
    assert (removed.level, removed.name, removed.weight, removed.heads) == (
        "token",
        "token:2",
        0.0,
        tuple(cross),
    )
    layer = cross[0].layer
    scaled = token_target(registry, f"token:1*2.5@{layer}", n_tokens=5)
    assert scaled.name == f"token:1*2.5@{layer}" and scaled.weight == 2.5
    assert scaled.heads == tuple(a for a in cross if a.layer == layer)
    one = token_target(registry, f"token:0@{cross[3]}", n_tokens=5)
    assert one.heads == (cross[3],)
    for bad in (
        "token:5",
        "token:-1",
        "token:x",
        "token:1*-2",
        "token:1*inf",
        "head:1",
        f"token:1@{layer}x",
    ):
        assert token_target(registry, bad, n_tokens=5) is None, bad
    words = targets(
        registry, "token", tokens=("<s>", "a", None, "</s>")
    )  # padding (None) is no word
    assert [t.name for t in words] == ["token:0", "token:1", "token:3"]
    assert [t.name for t in targets(registry, "token", tokens=("a", "b"), token_weight=3)] == [
        "token:0*3",
        "token:1*3",
    ]


def _resnet_input(block, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, block.in_channels, 8, 8, generator=g)
    temb = torch.randn(2, block.time_emb_proj.in_features, generator=g)
    return x, temb


@pytest.mark.parametrize(
    "name", ["mid_block.resnets.0", "up_blocks.0.resnets.1"]
)  # without and with a 1x1 shortcut
def test_replacing_the_residual_branch_equals_editing_the_blocks_weights(small_unet, name):
    """r = 0 equals the block with its last convolution zeroed (out = shortcut(x)); the branch recorded is what
    that convolution adds; an identity replacement changes nothing."""
    block = dict(resnet_blocks(small_unet))[name]
    x, temb = _resnet_input(block)
    edited = copy.deepcopy(block)
    with torch.no_grad():
        edited.conv2.weight.zero_()
        edited.conv2.bias.zero_()
        plain, without = block(x, temb), edited(x, temb)
        record = []
        with resnet_intervention(block, replace=torch.zeros_like, record=record):
            zeroed = block(x, temb)
        with resnet_intervention(block, replace=lambda r: r):
            same = block(x, temb)
    torch.testing.assert_close(zeroed, without, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(record[0], plain - without, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(same, plain, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(block(x, temb), plain)  # the hook is gone afterwards


def test_resnet_blocks_that_resample_inside_are_refused():
    from diffusers.models.resnet import ResnetBlock2D

    block = ResnetBlock2D(in_channels=8, temb_channels=None, groups=4, down=True)
    with pytest.raises(DiffcircuitError, match="resample internally"), resnet_intervention(block):
        pass
