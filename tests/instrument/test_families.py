"""Instrumentation beyond UNet2DModel: a text-conditioned UNet (self- and cross-attention heads), a
class-conditional DiT, a PixArt-style transformer and SD3's joint attention.

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
    for info in (
        registry.layers
    ):  # queries of transformer blocks are token sequences over the 16x16 or 8x8 grid
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
        torch.testing.assert_close(
            captured["fused"][layer], captured["naive"][layer], atol=1e-4, rtol=0
        )
    # plain reference for one cross-attention layer: q from the image tokens, k from the text, softmax(qkᵀ/√d)
    layer = next(i.layer for i in registry.layers if i.kind == "cross")
    attn = dict(attention_modules(net))[layer]
    seen = {}
    hooks = [
        getattr(attn, name).register_forward_hook(
            lambda m, a, o, name=name: seen.__setitem__(name, o)
        )
        for name in ("to_q", "to_k")
    ]
    with torch.no_grad():
        net(x, t, encoder_hidden_states=enc)
    for h in hooks:
        h.remove()
    q, k = seen["to_q"], seen["to_k"]
    b, heads = q.shape[0], attn.heads
    d = q.shape[-1] // heads
    q = q.view(b, -1, heads, d).transpose(1, 2)
    k = k.view(b, -1, heads, d).transpose(1, 2)
    p = torch.softmax(q @ k.transpose(-1, -2) / d**0.5, dim=-1)
    reference = -(p * p.clamp_min(1e-30).log()).sum(-1).mean(-1)  # [batch, heads]
    torch.testing.assert_close(captured["fused"][layer], reference, atol=1e-4, rtol=0)


def _idle_exact_and_fused_equals_naive(
    net, registry, x, t, kw, key_features=None, stats=("entropy_nats",)
) -> dict:
    """Instrumented idle, and capturing by either method, the output is the untouched model's; fused and naive
    capture agree. Returns the fused capture: ``{stat: {layer: tensor}}``."""
    with torch.no_grad():
        ref = net(x, timestep=t, **kw).sample
        with instrument(net, registry=registry):
            torch.testing.assert_close(net(x, timestep=t, **kw).sample, ref, atol=1e-5, rtol=0)
        captured = {}
        for method in ("fused", "naive"):
            with instrument(
                net, registry=registry, capture=True, method=method, key_features=key_features
            ) as session:
                torch.testing.assert_close(net(x, timestep=t, **kw).sample, ref, atol=1e-5, rtol=0)
            captured[method] = {stat: session.pop(stat) for stat in stats}
    for stat in stats:
        assert captured["fused"][stat]  # something was captured
        for layer in captured["fused"][stat]:
            torch.testing.assert_close(
                captured["fused"][stat][layer], captured["naive"][stat][layer], atol=1e-4, rtol=0
            )
    return captured["fused"]


def test_dit_idle_exactness_and_fused_equals_naive():
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    net = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=10,
    ).eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.tensor([1, 3])
    registry = probe_registry(net, x, t, class_labels=y)
    assert [(i.kind, i.heads, i.n_keys, i.query_grid) for i in registry.layers] == [
        ("self", 2, 16, (4, 4))
    ] * 2  # 4x4 patches
    _idle_exact_and_fused_equals_naive(net, registry, x, t, dict(class_labels=y))


@pytest.fixture(scope="module")
def joint():
    """A tiny SD3 transformer (joint attention; qk RMS norms; block 0 also has a second, image-only attention)."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    net = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        caption_projection_dim=16,
        pooled_projection_dim=8,
        out_channels=4,
        pos_embed_max_size=8,
        qk_norm="rms_norm",
        dual_attention_layers=(0,),
    ).eval()
    for (
        name,
        p,
    ) in net.named_parameters():  # the norms start at 1: perturb them so a skipped norm shows
        if "norm_" in name:
            p.data.add_(0.3 * torch.randn_like(p))
    g = torch.Generator().manual_seed(2)
    kw = dict(
        encoder_hidden_states=torch.randn(2, 5, 16, generator=g),
        pooled_projections=torch.randn(2, 8, generator=g),
    )
    return net, torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10.0, 500.0]), kw


def _joint_qk(net, layer, x, t, kw):
    """Plain reference: a joint layer's per-head queries of the image and keys [image | text], normalised as SD3 does."""
    attn = dict(attention_modules(net))[layer]
    seen = {}
    hooks = [
        getattr(attn, n).register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(n, o))
        for n in ("to_q", "to_k", "add_k_proj")
    ]
    with torch.no_grad():
        net(x, timestep=t, **kw)
    for h in hooks:
        h.remove()
    split = lambda y: y.view(y.shape[0], -1, attn.heads, y.shape[-1] // attn.heads).transpose(1, 2)  # noqa: E731
    q = attn.norm_q(split(seen["to_q"]))
    k = torch.cat(
        [attn.norm_k(split(seen["to_k"])), attn.norm_added_k(split(seen["add_k_proj"]))], dim=2
    )
    return q, k


def test_joint_attention_registry_idle_exactness_fused_naive_and_a_plain_reference(joint):
    net, x, t, kw = joint
    registry = probe_registry(net, x, t, **kw)
    assert [(i.layer, i.kind, i.query_grid, i.n_keys) for i in registry.layers] == [
        ("transformer_blocks.0.attn", "joint", (4, 4), 16 + 5),
        ("transformer_blocks.0.attn2", "self", (4, 4), 16),
        ("transformer_blocks.1.attn", "joint", (4, 4), 16 + 5),
    ]
    feats = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    fused = _idle_exact_and_fused_equals_naive(
        net, registry, x, t, kw, key_features=lambda grid: feats, stats=("entropy_nats", "moments")
    )
    # reference: the image queries' softmax over all keys; moments of its image part renormalised
    layer = "transformer_blocks.1.attn"
    q, k = _joint_qk(net, layer, x, t, kw)
    p = torch.softmax(
        q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1
    )  # [batch, heads, 16, 21]
    entropy = -(p * p.log()).sum(-1).mean(-1)
    torch.testing.assert_close(fused["entropy_nats"][layer], entropy, atol=1e-4, rtol=0)
    image = p[..., :16] / p[..., :16].sum(-1, keepdim=True)
    f = torch.cat([torch.ones(2, 1, 16), feats.flatten(2)], 1)  # [batch, 1 + channels, keys]
    moments = (
        torch.einsum("bhqk,bfk,bgq->bhgf", image, f, f) / 16
    )  # M[g, f] = mean_i g_i Σ_j p_ij f_j
    torch.testing.assert_close(fused["moments"][layer], moments, atol=1e-4, rtol=0)


def test_zero_ablating_a_joint_head_equals_zeroing_its_columns_of_both_output_projections(joint):
    import copy

    net, x, t, kw = joint
    layer, head, d = "transformer_blocks.0.attn", 1, 8
    edited = copy.deepcopy(net)
    attn = dict(attention_modules(edited))[layer]
    with torch.no_grad():
        for proj in (
            attn.to_out[0],
            attn.to_add_out,
        ):  # the head's slice enters the image and the text stream
            proj.weight[:, head * d : (head + 1) * d] = 0
        expected = edited(x, timestep=t, **kw).sample
        with instrument(net, zero_heads=[f"{layer}:{head}"]):
            out = net(x, timestep=t, **kw).sample
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    assert (out - net(x, timestep=t, **kw).sample).abs().max() > 1e-3  # the ablation did something


def test_removing_a_text_token_from_every_joint_softmax_equals_dropping_it_from_the_prompt(joint):
    net, x, t, kw = joint
    registry = probe_registry(net, x, t, **kw)
    token = 2
    scales = {
        str(a): {token: 0.0} for a in registry if registry.layer(str(a.layer)).kind == "joint"
    }
    dropped = dict(
        kw,
        encoder_hidden_states=torch.cat(
            [kw["encoder_hidden_states"][:, :token], kw["encoder_hidden_states"][:, token + 1 :]], 1
        ),
    )
    with torch.no_grad():
        expected = net(x, timestep=t, **dropped).sample
        with instrument(net, registry=registry, token_scales=scales):
            out = net(x, timestep=t, **kw).sample
        half = {a: {token: 0.5} for a in scales}
        with instrument(net, registry=registry, token_scales=half):  # reweighting lies between
            between = net(x, timestep=t, **kw).sample
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    full = net(x, timestep=t, **kw).sample
    assert 0 < (between - full).abs().max() < (out - full).abs().max()


@pytest.fixture(scope="module")
def flux():
    """A tiny Flux transformer: one double-stream (joint) block and two single-stream blocks, rotary embeddings."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    net = FluxTransformer2DModel(
        patch_size=1,
        in_channels=8,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        pooled_projection_dim=8,
        axes_dims_rope=(2, 2, 4),
    ).eval()
    side, tokens = 4, 5
    ids = torch.zeros(side, side, 3)
    ids[..., 1], ids[..., 2] = torch.arange(side)[:, None], torch.arange(side)[None, :]
    g = torch.Generator().manual_seed(3)
    kw = dict(
        encoder_hidden_states=torch.randn(2, tokens, 16, generator=g),
        pooled_projections=torch.randn(2, 8, generator=g),
        img_ids=ids.reshape(-1, 3),
        txt_ids=torch.zeros(tokens, 3),
    )
    return net, torch.randn(2, side * side, 8, generator=g), torch.tensor([0.3, 0.7]), kw


def test_flux_registry_idle_exactness_fused_naive_and_a_plain_reference_with_rotary_embeddings(
    flux,
):
    from diffusers.models.embeddings import apply_rotary_emb

    net, x, t, kw = flux
    registry = probe_registry(net, x, t, **kw)
    assert [(i.layer, i.kind, i.query_grid, i.n_keys) for i in registry.layers] == [
        ("transformer_blocks.0.attn", "joint", (4, 4), 21),
        ("single_transformer_blocks.0.attn", "joint", (4, 4), 21),
        ("single_transformer_blocks.1.attn", "joint", (4, 4), 21),
    ]
    fused = _idle_exact_and_fused_equals_naive(net, registry, x, t, kw)["entropy_nats"]
    # reference for a single-stream block: its input [text | image], normalised, rotated, softmax over all keys
    attn = dict(attention_modules(net))["single_transformer_blocks.1.attn"]
    seen = {}
    hook = attn.register_forward_hook(
        lambda m, a, k, o: seen.update(h=k["hidden_states"], rope=k["image_rotary_emb"]),
        with_kwargs=True,
    )
    with torch.no_grad():
        net(x, timestep=t, **kw)
        hook.remove()
        q = apply_rotary_emb(
            attn.norm_q(attn.to_q(seen["h"]).unflatten(-1, (2, 8))), seen["rope"], sequence_dim=1
        )
        k = apply_rotary_emb(
            attn.norm_k(attn.to_k(seen["h"]).unflatten(-1, (2, 8))), seen["rope"], sequence_dim=1
        )
    p = torch.softmax(q.transpose(1, 2) @ k.permute(0, 2, 3, 1) / 8**0.5, dim=-1)[
        :, :, 5:
    ]  # image queries
    torch.testing.assert_close(
        fused["single_transformer_blocks.1.attn"],
        -(p * p.log()).sum(-1).mean(-1),
        atol=1e-4,
        rtol=0,
    )


def test_flux_head_ablation_equals_zeroing_its_output_columns_and_token_removal_equals_dropping_it(
    flux,
):
    import copy

    net, x, t, kw = flux
    registry = probe_registry(net, x, t, **kw)
    edited = copy.deepcopy(net)
    with torch.no_grad():
        double = edited.transformer_blocks[0].attn
        for proj in (double.to_out[0], double.to_add_out):
            proj.weight[:, 8:16] = 0  # head 1 of the double-stream block
        edited.single_transformer_blocks[1].proj_out.weight[:, 0:8] = (
            0  # head 0 of a single-stream block
        )
        expected = edited(x, timestep=t, **kw).sample
        with instrument(
            net, zero_heads=["transformer_blocks.0.attn:1", "single_transformer_blocks.1.attn:0"]
        ):
            torch.testing.assert_close(net(x, timestep=t, **kw).sample, expected, atol=1e-5, rtol=0)
        token = 3
        dropped = dict(
            kw,
            encoder_hidden_states=torch.cat(
                [
                    kw["encoder_hidden_states"][:, :token],
                    kw["encoder_hidden_states"][:, token + 1 :],
                ],
                1,
            ),
            txt_ids=kw["txt_ids"][:-1],
        )
        without = net(x, timestep=t, **dropped).sample
        removed = {str(a): {token: 0.0} for a in registry}
        with instrument(net, registry=registry, token_scales=removed):
            torch.testing.assert_close(net(x, timestep=t, **kw).sample, without, atol=1e-5, rtol=0)


def test_pixart_style_transformer_registry_idle_exactness_and_fused_equals_naive():
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    net = PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=3,
        out_channels=6,
        num_layers=2,
        sample_size=16,
        patch_size=2,
        cross_attention_dim=16,
        caption_channels=12,
        norm_num_groups=8,
    ).eval()
    x, t, enc = torch.randn(2, 3, 16, 16), torch.tensor([10, 500]), torch.randn(2, 5, 12)
    kw = dict(
        encoder_hidden_states=enc, added_cond_kwargs={"resolution": None, "aspect_ratio": None}
    )
    registry = probe_registry(net, x, t, **kw)
    assert [(i.kind, i.query_grid, i.n_keys) for i in registry.layers] == [
        ("self", (8, 8), 64),
        ("cross", (8, 8), 5),
    ] * 2
    _idle_exact_and_fused_equals_naive(net, registry, x, t, kw)
