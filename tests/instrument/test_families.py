"""Instrumentation beyond UNet2DModel: a text-conditioned UNet (self- and cross-attention heads) and a
class-conditional DiT.

Registry kinds and query grids (token sequences mapped back onto the image grid), idle exactness,
fused = naive capture, and the cross-attention entropy against a plain-PyTorch reference. The commands
(prompts, class labels) are tested in tests/integration/test_families_cli.py.
"""

from __future__ import annotations

import pytest
import torch

from diffcircuit import instrument, probe_registry
from diffcircuit.instrument.registry import attention_modules

TOKENS, TEXT_DIM = 7, 24


@pytest.fixture(scope="module")
def conditional(text_unet):
    net = text_unet(text_dim=TEXT_DIM)
    g = torch.Generator().manual_seed(1)
    x, enc = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, TOKENS, TEXT_DIM, generator=g)
    t = torch.tensor([10, 500])
    return net, x, t, enc


def test_registry_knows_self_and_cross_attention(conditional):
    net, x, t, enc = conditional
    registry = probe_registry(net, x, t, encoder_hidden_states=enc)
    kinds = {info.layer: (info.kind, info.n_keys) for info in registry.layers}
    assert {k for k, _ in kinds.values()} == {"self", "cross"}
    for layer, (kind, n_keys) in kinds.items():
        assert kind == ("cross" if layer.endswith("attn2") else "self")
        if kind == "cross":
            assert n_keys == TOKENS  # keys are the text tokens
    for info in registry.layers:  # queries of transformer blocks are token sequences over the 16x16 or 8x8 grid
        assert info.query_grid in ((16, 16), (8, 8))
        assert info.kind == "cross" or info.query_grid[0] * info.query_grid[1] == info.n_keys


def test_idle_instrumentation_reproduces_the_untouched_model(conditional):
    net, x, t, enc = conditional
    with torch.no_grad():
        ref = net(x, t, encoder_hidden_states=enc).sample
        with instrument(net):
            out = net(x, t, encoder_hidden_states=enc).sample
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_fused_capture_equals_naive_and_a_plain_reference_on_cross_attention(conditional):
    net, x, t, enc = conditional
    registry = probe_registry(net, x, t, encoder_hidden_states=enc)
    captured = {}
    with torch.no_grad():
        for method in ("fused", "naive"):
            with instrument(net, registry=registry, capture=True, method=method) as session:
                net(x, t, encoder_hidden_states=enc)
            captured[method] = session.pop("entropy_nats")
    for layer in captured["fused"]:
        torch.testing.assert_close(captured["fused"][layer], captured["naive"][layer], atol=1e-4, rtol=0)
    # plain reference for one cross-attention layer: q from the image tokens, k from the text, softmax(qkᵀ/√d)
    layer = next(i.layer for i in registry.layers if i.kind == "cross")
    attn = dict(attention_modules(net))[layer]
    seen = {}
    hooks = [getattr(attn, name).register_forward_hook(lambda m, a, o, name=name: seen.__setitem__(name, o))
             for name in ("to_q", "to_k")]
    with torch.no_grad():
        net(x, t, encoder_hidden_states=enc)
    for h in hooks:
        h.remove()
    q, k = seen["to_q"], seen["to_k"]
    b, heads = q.shape[0], attn.heads
    d = q.shape[-1] // heads
    q = q.view(b, -1, heads, d).transpose(1, 2)
    k = k.view(b, -1, heads, d).transpose(1, 2)
    p = torch.softmax(q @ k.transpose(-1, -2) / d ** 0.5, dim=-1)
    reference = -(p * p.clamp_min(1e-30).log()).sum(-1).mean(-1)  # [batch, heads]
    torch.testing.assert_close(captured["fused"][layer], reference, atol=1e-4, rtol=0)


def test_dit_idle_exactness_and_fused_equals_naive():
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    net = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
                                sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.tensor([1, 3])
    registry = probe_registry(net, x, t, class_labels=y)
    assert [(i.kind, i.heads, i.n_keys, i.query_grid) for i in registry.layers] == [("self", 2, 16, (4, 4))] * 2  # 4x4 patches
    with torch.no_grad():
        ref = net(x, timestep=t, class_labels=y).sample
        with instrument(net, registry=registry):
            torch.testing.assert_close(net(x, timestep=t, class_labels=y).sample, ref, atol=1e-5, rtol=0)
        captured = {}
        for method in ("fused", "naive"):
            with instrument(net, registry=registry, capture=True, method=method) as session:
                net(x, timestep=t, class_labels=y)
            captured[method] = session.pop("entropy_nats")
    for layer in captured["fused"]:
        torch.testing.assert_close(captured["fused"][layer], captured["naive"][layer], atol=1e-4, rtol=0)


def test_joint_attention_is_refused_rather_than_computed_wrongly():
    from diffusers import SD3Transformer2DModel

    from diffcircuit.errors import DiffcircuitError
    from diffcircuit.instrument.registry import HeadRegistry

    torch.manual_seed(0)
    net = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                                num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                pooled_projection_dim=8, out_channels=4, pos_embed_max_size=8).eval()
    assert {i.kind for i in HeadRegistry.from_model(net).layers} == {"joint"}  # the registry knows what it is
    with pytest.raises(DiffcircuitError, match="JointAttnProcessor2_0"):
        with instrument(net):
            pass
    assert all(type(m.processor).__name__ == "JointAttnProcessor2_0" for _, m in attention_modules(net))  # untouched


def test_pixart_style_transformer_registry_idle_exactness_and_fused_equals_naive():
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    net = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=3, out_channels=6, num_layers=2,
                                   sample_size=16, patch_size=2, cross_attention_dim=16, caption_channels=12,
                                   norm_num_groups=8).eval()
    x, t, enc = torch.randn(2, 3, 16, 16), torch.tensor([10, 500]), torch.randn(2, 5, 12)
    kw = dict(encoder_hidden_states=enc, added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    registry = probe_registry(net, x, t, **kw)
    assert [(i.kind, i.query_grid, i.n_keys) for i in registry.layers] == [("self", (8, 8), 64), ("cross", (8, 8), 5)] * 2
    with torch.no_grad():
        ref = net(x, timestep=t, **kw).sample
        with instrument(net, registry=registry):
            torch.testing.assert_close(net(x, timestep=t, **kw).sample, ref, atol=1e-5, rtol=0)
        captured = {}
        for method in ("fused", "naive"):
            with instrument(net, registry=registry, capture=True, method=method) as session:
                net(x, timestep=t, **kw)
            captured[method] = session.pop("entropy_nats")
    for layer in captured["fused"]:
        torch.testing.assert_close(captured["fused"][layer], captured["naive"][layer], atol=1e-4, rtol=0)
