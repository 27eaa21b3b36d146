"""The instrumented processor against the untouched model and an independent PyTorch reference."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from diffcircuit import HeadAddress, instrument, probe_registry
from diffcircuit.instrument.registry import attention_modules


def _inputs(batch=4, size=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=g), torch.tensor([10, 300, 600, 990][:batch])


def _reference_entropy(model, x, t) -> dict[str, torch.Tensor]:
    """Per-layer [batch, heads] mean-over-queries entropy, from the module weights directly."""
    inputs = {}
    hooks = [
        m.register_forward_pre_hook(lambda mod, args, name=name: inputs.__setitem__(name, args[0]))
        for name, m in attention_modules(model)
    ]
    try:
        with torch.no_grad():
            model(x, t)
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for name, attn in attention_modules(model):
        h = inputs[name]  # [batch, channels, height, width]
        b, c = h.shape[:2]
        tokens = attn.group_norm(h.reshape(b, c, -1)).transpose(1, 2)  # [batch, pos, channels]
        q = F.linear(tokens, attn.to_q.weight, attn.to_q.bias)
        k = F.linear(tokens, attn.to_k.weight, attn.to_k.bias)
        d = q.shape[-1] // attn.heads
        q = q.reshape(b, -1, attn.heads, d).permute(0, 2, 1, 3).double()  # [batch, heads, pos, d]
        k = k.reshape(b, -1, attn.heads, d).permute(0, 2, 1, 3).double()
        p = torch.softmax(torch.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(d), dim=-1)
        out[name] = torch.special.entr(p).sum(-1).mean(-1).float()  # [batch, heads]
    return out


def test_idle_instrumentation_reproduces_default_output(small_unet):
    x, t = _inputs()
    with torch.no_grad():
        expected = small_unet(x, t).sample
        with instrument(small_unet):
            got = small_unet(x, t).sample
    assert (got - expected).abs().max().item() <= 1e-5


def test_capture_leaves_output_unchanged_and_matches_reference_entropy(small_unet):
    x, t = _inputs()
    reference = _reference_entropy(small_unet, x, t)
    with torch.no_grad():
        expected = small_unet(x, t).sample
        with instrument(small_unet, capture=True) as session:
            got = small_unet(x, t).sample
    captured = session.pop("entropy_nats")
    assert (got - expected).abs().max().item() <= 1e-5
    assert set(captured) == set(reference)
    for layer, ref in reference.items():
        assert captured[layer].shape == ref.shape
        torch.testing.assert_close(captured[layer], ref, atol=1e-4, rtol=0)
    # entropy lies between 0 and the uniform bound ln(n_keys), and is not trivially uniform
    grid_keys = {
        name: probe.n_keys
        for name, probe in ((i.layer, i) for i in probe_registry(small_unet, x[:1], t[:1]).layers)
    }
    for layer, values in captured.items():
        assert (values >= 0).all() and (values <= math.log(grid_keys[layer]) + 1e-5).all()


def test_capture_computes_only_the_statistics_asked_for(small_unet):
    x, t = _inputs()
    asked = []

    def features(grid):  # key features: only needed for moments
        asked.append(grid)
        return torch.rand(x.shape[0], 2, *grid)

    with (
        torch.no_grad(),
        instrument(small_unet, capture=("entropy_nats",), key_features=features) as session,
    ):
        small_unet(x, t)
    assert asked == [] and session.pop("moments") == {} and session.pop("perplexity") == {}
    reference = _reference_entropy(small_unet, x, t)
    captured = session.pop("entropy_nats")
    assert set(captured) == set(reference)
    for layer, values in captured.items():
        torch.testing.assert_close(values, reference[layer], atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="capture"):
        with instrument(small_unet, capture=("entropy",)):
            pass


def test_zero_ablation_equals_zeroing_the_heads_output_projection_columns(small_unet):
    x, t = _inputs()
    layer, head = "down_blocks.1.attentions.0", 2
    edited = copy.deepcopy(small_unet)
    attn = dict(attention_modules(edited))[layer]
    d = attn.inner_dim // attn.heads
    with torch.no_grad():
        attn.to_out[0].weight[:, head * d : (head + 1) * d] = 0.0
        expected = edited(x, t).sample
        with instrument(small_unet, zero_heads=[f"{layer}:{head}"]):
            got = small_unet(x, t).sample
        clean = small_unet(x, t).sample
    assert (got - expected).abs().max().item() <= 1e-5
    assert (got - clean).abs().max().item() > 1e-4  # the ablation did something


def test_processors_are_restored_even_when_the_forward_raises(small_unet):
    before = [m.processor for _, m in attention_modules(small_unet)]
    with pytest.raises(RuntimeError):
        with instrument(small_unet, capture=True):
            small_unet(torch.randn(1, 5, 16, 16), torch.tensor([1]))  # wrong channel count
    assert [m.processor for _, m in attention_modules(small_unet)] == before


def test_registry_addresses_every_head_once(small_unet):
    x, t = _inputs(batch=1)
    registry = probe_registry(small_unet, x, t)
    expected = {
        name: m.heads for name, m in small_unet.named_modules() if type(m).__name__ == "Attention"
    }
    assert {info.layer: info.heads for info in registry.layers} == expected
    addresses = [str(a) for a in registry]
    assert len(addresses) == len(set(addresses)) == sum(expected.values())
    assert registry.parse("mid_block.attentions.0:1") == HeadAddress(
        layer="mid_block.attentions.0", head=1
    )
    first = registry.layers[0]
    assert first.query_grid == (16, 16) and first.n_keys == 256 and first.kind == "self"
    assert [i.layer.split(".")[0] for i in registry.layers] == ["down_blocks"] * 2 + [
        "mid_block"
    ] + ["up_blocks"] * 4
