"""The session's protocol: what it records, and how it refuses what it does not know."""

from __future__ import annotations

import pytest
import torch

import diffcircuit as dc


def test_popping_a_statistic_that_does_not_exist_is_refused_naming_the_known_ones(small_unet):
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 500])
    with torch.no_grad(), dc.instrument(small_unet, capture=True) as session:
        small_unet(x, t)
    with pytest.raises(dc.DiffcircuitError, match="no statistic 'entropy'.*entropy_nats"):
        session.pop("entropy")  # a typo: not silently {}
    entropy = session.pop("entropy_nats")
    assert entropy and all(v.shape[0] == 2 for v in entropy.values())
    assert session.pop("entropy_nats") == {}  # popped: a known statistic with nothing new is empty


def test_head_outputs_are_cached_by_layer_or_by_head_address(small_unet):
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 500])
    registry = dc.probe_registry(small_unet, x[:1], t[:1])
    info = registry.layers[0]
    layer, module = info.layer, small_unet.get_submodule(info.layer)
    seen = []  # the output projection's input in a plain forward: [batch, q_pos, heads * d]
    handle = module.to_out[0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            small_unet(x, t)
    finally:
        handle.remove()
    heads = seen[0].unflatten(-1, (module.heads, -1)).transpose(1, 2)  # [batch, heads, q_pos, d]
    with torch.no_grad():
        with dc.instrument(small_unet, registry=registry, cache_heads=[layer]) as by_layer:
            small_unet(x, t)
        with dc.instrument(small_unet, registry=registry, cache_heads=[f"{layer}:1"]) as by_head:
            small_unet(x, t)
    whole, one = by_layer.pop("head_out"), by_head.pop("head_out")
    torch.testing.assert_close(whole[layer], heads)
    assert list(one) == [f"{layer}:1"]  # only the head asked for: not its whole layer
    torch.testing.assert_close(one[f"{layer}:1"], heads[:, 1])


def test_a_cached_head_keeps_its_gradient_with_keep_graph(small_unet):
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 500])
    registry = dc.probe_registry(small_unet, x[:1], t[:1])
    layer = registry.layers[0].layer
    grads = {}
    for name in (layer, f"{layer}:1"):
        with dc.instrument(small_unet, registry=registry, cache_heads=[name], keep_graph=True) as s:
            loss = small_unet(x, t).sample.square().sum()
        (cached,) = s.pop("head_out").values()
        (grads[name],) = torch.autograd.grad(loss, cached)
    torch.testing.assert_close(grads[f"{layer}:1"], grads[layer][:, 1])
