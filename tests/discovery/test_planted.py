"""Planted ground truth (``discovery.planted``): dead heads, the essential head, a redundant pair and forced
attention, checked by what they do to the network's computation (plain forwards of small random-weight UNets)
and, for forced attention, against attention entropy worked out by hand."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import diffcircuit as dc
from diffcircuit.discovery.planted import (
    centre_logits,
    duplicate_head,
    edge_logits,
    forcing,
    plant,
    zero_heads,
)
from diffcircuit.errors import ConfigError
from diffcircuit.instrument.registry import attention_modules
from diffcircuit.metrics.probes import PROBE_CHANNELS

LAYER = "down_blocks.1.attentions.0"  # the small UNet's 8x8 layer: 4 heads of 8 dims


def _forward(net, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, t = torch.randn(2, 3, 16, 16, generator=g), torch.tensor([100, 700])
    with torch.no_grad():
        return net(x, t).sample


def _scramble(net, layer, head, seed=1):
    """Random query, key and value rows for one head (its own function replaced)."""
    attn = dict(attention_modules(net))[layer]
    d = attn.inner_dim // attn.heads
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for linear in (attn.to_q, attn.to_k, attn.to_v):
            rows = linear.weight[head * d : (head + 1) * d]
            rows.copy_(torch.randn(rows.shape, generator=g))


def test_planting_edits_a_copy_and_leaves_one_live_head_in_the_essential_layer(small_unet):
    before = {k: v.clone() for k, v in small_unet.state_dict().items()}
    layer = "down_blocks.1.attentions.0"
    p = plant(
        small_unet,
        dead=["down_blocks.0.attentions.0:1", f"{layer}:0"],
        essential_layer=layer,
        essential_head=2,
    )
    assert all(
        torch.equal(before[k], v) for k, v in small_unet.state_dict().items()
    )  # the original is untouched
    assert p.dead == ("down_blocks.0.attentions.0:1",) and p.essential == f"{layer}:2"
    attn = dict(attention_modules(p.network))[layer]
    d = attn.inner_dim // attn.heads
    w = attn.to_out[0].weight
    live = [h for h in range(attn.heads) if w[:, h * d : (h + 1) * d].abs().sum() > 0]
    assert live == [2]
    dead_attn = dict(attention_modules(p.network))["down_blocks.0.attentions.0"]
    assert dead_attn.to_out[0].weight[:, d : 2 * d].abs().sum() == 0


def test_a_dead_head_affects_nothing_and_a_live_one_does(small_unet):
    dead = copy.deepcopy(small_unet)
    zero_heads(dead, [f"{LAYER}:1"])
    before = _forward(dead)
    scrambled_dead, scrambled_live = copy.deepcopy(dead), copy.deepcopy(dead)
    _scramble(scrambled_dead, LAYER, 1)
    _scramble(scrambled_live, LAYER, 2)
    torch.testing.assert_close(_forward(scrambled_dead), before, atol=1e-6, rtol=0)
    assert (_forward(scrambled_live) - before).abs().max() > 1e-3


def test_a_duplicated_pair_computes_what_the_source_head_computed_alone(small_unet):
    """Head 3 copies head 0, both halved: the network equals the one with head 3 dead and head 0 at full weight;
    and head 3's own weights no longer matter beyond what it copied."""
    dup, alone = copy.deepcopy(small_unet), copy.deepcopy(small_unet)
    duplicate_head(dup, LAYER, 0, 3)
    zero_heads(alone, [f"{LAYER}:3"])
    torch.testing.assert_close(_forward(dup), _forward(alone), atol=1e-5, rtol=1e-5)
    assert (
        _forward(dup) - _forward(small_unet)
    ).abs().max() > 1e-4  # head 3's own function is gone


def test_impossible_plantings_are_refused(small_unet):
    with pytest.raises(ConfigError):
        duplicate_head(copy.deepcopy(small_unet), LAYER, 2, 2)
    with pytest.raises(ConfigError, match="outside the essential layer"):
        plant(small_unet, dead=[], essential_layer=LAYER, redundant=(LAYER, 0, 1))


def test_patterns_put_their_weight_where_they_say():
    feats = torch.zeros(1, 4, len(PROBE_CHANNELS))
    feats[0, :, PROBE_CHANNELS.index("edge")] = torch.tensor([0.1, 0.4, 0.2, 0.0])
    feats[0, :, PROBE_CHANNELS.index("r2")] = torch.tensor([2.0, 0.5, 0.5, 4.5])
    torch.testing.assert_close(edge_logits(feats), torch.tensor([[10.0, 40.0, 20.0, 0.0]]))
    torch.testing.assert_close(centre_logits(feats), -torch.tensor([[2.0, 0.5, 0.5, 4.5]]))


def test_a_forced_positional_head_attends_by_distance_from_the_centre_and_the_processors_come_back():
    """Every query of the forced head attends softmax(−r²) over the 16x16 grid of keys (r measured from the grid's
    centre in cells), so its entropy is that distribution's, worked out here; the layer's other heads (same
    inputs) attend as they did unforced."""
    den = dc.load_denoiser()
    layer = "down_blocks.1.attentions.0"  # the embedded model's 16x16 layer at 32x32 images
    images = dc.load_images("faces", n=2, size=32, channels=3).images
    processors = [m.processor for _, m in attention_modules(den.network)]
    plain = dc.observe(den, images, timesteps=[300]).heads
    with forcing(den.network, centre_logits, {layer: [3]}):
        forced = dc.observe(den, images, timesteps=[300]).heads
    assert [m.processor for _, m in attention_modules(den.network)] == processors
    centred = torch.arange(16, dtype=torch.float64) - 7.5
    p = torch.softmax(-(centred[:, None] ** 2 + centred[None, :] ** 2).flatten(), 0)
    entropy = float(-(p * p.log()).sum())
    head = forced[(forced.layer == layer) & (forced["head"] == 3)]
    assert head.entropy_nats.to_numpy() == pytest.approx([entropy] * 2, rel=1e-4)
    assert entropy < math.log(256) / 2  # far from uniform: the check can tell
    others = (forced.layer == layer) & (forced["head"] != 3)
    assert forced[others].entropy_nats.to_numpy() == pytest.approx(
        plain[others].entropy_nats.to_numpy(), rel=1e-5
    )
