"""Gallery attention maps against diffusers' own explicit-softmax processor."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import DDPMScheduler
from diffusers.models.attention_processor import AttnProcessor

from diffcircuit import Denoiser, probe_registry
from diffcircuit.data.synthetic import synthetic_images
from diffcircuit.instrument.registry import attention_modules
from diffcircuit.metrics.gallery import attention_maps, object_queries
from diffcircuit.models.noise import image_noise


def _record_probabilities(modules: dict, names) -> dict:
    """Switch ``names`` to diffusers' AttnProcessor, which materialises softmax(QKᵀ/√d) in get_attention_scores,
    and record what it computes there: the independent reference (filled by the next forward)."""
    probs = {}
    for name in names:
        attn = modules[name]
        attn.set_processor(AttnProcessor())
        get = attn.get_attention_scores

        def record(query, key, mask=None, name=name, get=get):
            probs[name] = get(query, key, mask)
            return probs[name]

        attn.get_attention_scores = record
    return probs


def _forward_as_the_gallery_does(den, images, timestep: int) -> None:
    """One forward on the images noised as every analysis noises them (per-image seeded draws, dataset "a")."""
    x0 = torch.from_numpy(images)
    eps = torch.stack(
        [
            image_noise(x0.shape[1:], seed=0, dataset="a", image=i, timestep=timestep)
            for i in range(len(x0))
        ]
    )
    t = torch.full((len(x0),), timestep)
    with torch.no_grad():
        den.predict(
            den.scheduler.add_noise(x0, eps, t), t
        )  # with the model's conditioning and adapters


def test_maps_equal_the_probabilities_of_diffusers_attn_processor(small_unet):
    den = Denoiser(network=small_unet, scheduler=DDPMScheduler(), model_path=".", source="t")
    images, masks, _ = synthetic_images(3, size=16, seed=4)
    registry = probe_registry(
        small_unet, torch.from_numpy(images[:1]), torch.zeros(1, dtype=torch.long)
    )
    heads = [
        registry.parse("down_blocks.0.attentions.0:1"),
        registry.parse("mid_block.attentions.0:2"),
    ]
    queries = object_queries(masks, 3, 16)
    maps = attention_maps(den, images, heads=heads, timestep=300, queries=queries, dataset="a")
    # reference: diffusers' AttnProcessor materialises softmax(QKᵀ/√d) in get_attention_scores
    modules = dict(attention_modules(small_unet))
    probs = _record_probabilities(modules, ("down_blocks.0.attentions.0", "mid_block.attentions.0"))
    _forward_as_the_gallery_does(den, images, 300)
    for row in maps.itertuples():
        attn = modules[row.layer]
        ref = probs[row.layer].view(3, attn.heads, *probs[row.layer].shape[1:])[row.image, row.head]
        expected = ref[row.query_y * row.grid + row.query_x].numpy()
        np.testing.assert_allclose(row.map, expected, atol=1e-5)
        assert abs(row.map.sum() - 1) < 1e-5
    # the synthetic query sits on the object (its mask is true there)
    first = maps.iloc[0]
    scale = 16 // first.grid
    assert masks[0][
        first.query_y * scale : (first.query_y + 1) * scale,
        first.query_x * scale : (first.query_x + 1) * scale,
    ].any()


def test_token_maps_equal_diffusers_cross_attention_probabilities_and_aggregate_by_mean(text_unet):
    from diffcircuit.metrics.gallery import token_heatmaps, token_maps
    from diffcircuit.models.conditioning import Conditioning

    net = text_unet(text_dim=12, in_channels=3, sample_size=8, channels=(16, 32))
    enc = torch.randn(1, 5, 12)
    den = Denoiser(
        network=net,
        scheduler=DDPMScheduler(),
        model_path=".",
        source="t",
        conditioning=Conditioning(
            {"encoder_hidden_states": enc}, "test", ("<s>", "a", "b", "</s>")
        ),
    )
    images = synthetic_images(2, size=8, seed=1)[0]
    registry = probe_registry(den, torch.from_numpy(images[:1]))
    maps = token_maps(
        den,
        images,
        registry=registry,
        tokens=("<s>", "a", "b", "</s>"),
        timesteps=[300],
        dataset="a",
    )
    cross = [i.layer for i in registry.layers if i.kind == "cross"]
    assert set(maps.layer) == set(cross) and set(maps.token) == {
        0,
        1,
        2,
        3,
    }  # the 5th key is not a listed token
    modules = dict(attention_modules(net))
    probs = _record_probabilities(modules, cross)
    _forward_as_the_gallery_does(den, images, 300)
    for row in maps.itertuples():
        ref = probs[row.layer].view(2, modules[row.layer].heads, *probs[row.layer].shape[1:])[
            row.image, row.head
        ]
        np.testing.assert_allclose(row.map, ref[:, row.token].numpy(), atol=1e-5)
    same_size = maps[
        maps.grid_h == 8
    ]  # maps already at the image's size: the aggregate is their plain mean
    heat = token_heatmaps(same_size, 8)
    for row in heat.itertuples():
        g = same_size[(same_size.image == row.image) & (same_size.token == row.token)]
        np.testing.assert_allclose(
            row.heatmap, np.mean(np.stack(g["map"].to_numpy()), 0), atol=1e-6
        )


def test_flux_maps_equal_the_probabilities_of_diffusers_flux_processor(flux_folder, monkeypatch):
    """Flux's rotary embeddings act between the projections and the softmax; the reference is diffusers'
    FluxAttnProcessor itself, its attention call replaced by an explicit softmax that records the probabilities."""
    import diffusers.models.transformers.transformer_flux as flux_module

    from diffcircuit.metrics.gallery import token_maps
    from diffcircuit.models.loading import load_conditioned

    den = load_conditioned(
        str(flux_folder), prompt_embeds=str(flux_folder.parent / "embeds.safetensors")
    )
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)).numpy()
    registry = probe_registry(den)
    recorded = []

    def explicit(
        query, key, value, attn_mask=None, **kwargs
    ):  # [B, S, heads, d], as the native backend takes them
        q, k, v = (x.transpose(1, 2) for x in (query, key, value))
        p = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1)
        recorded.append(p)
        return (p @ v).transpose(1, 2)

    monkeypatch.setattr(flux_module, "dispatch_attention_fn", explicit)
    _forward_as_the_gallery_does(den, latents, timestep=300)
    double, single = recorded  # [B, heads, 5 + 64, 5 + 64] each: [text | image]
    maps = attention_maps(
        den,
        latents,
        heads=[registry.parse("single_transformer_blocks.0.attn:1")],
        timestep=300,
        queries=[(0.3, 0.6)] * 2,
    )
    at = 2 * 8 + 4  # row 2, column 4 of the 8x8 token grid
    for i, row in enumerate(maps.itertuples()):
        np.testing.assert_allclose(row.map, single[i, 1, 5 + at, 5:].numpy(), atol=1e-5)
    tokens = token_maps(
        den, latents, registry=registry, tokens=[f"<{j}>" for j in range(5)], timesteps=[300]
    )
    for r in tokens[
        (tokens.layer == "transformer_blocks.0.attn") & (tokens.head == 0)
    ].itertuples():
        np.testing.assert_allclose(r.map, double[r.image, 0, 5:, r.token].numpy(), atol=1e-5)


def test_maps_take_head_strings_and_the_callers_own_noisy_inputs(small_unet):
    from diffcircuit.metrics import attention_maps as exported
    from diffcircuit.models.noise import noisy_batch

    assert exported is attention_maps
    den = Denoiser(network=small_unet, scheduler=DDPMScheduler(), model_path=".", source="t")
    images, masks, _ = synthetic_images(2, size=16, seed=5)
    queries = object_queries(masks, 2, 16)
    by_address = attention_maps(
        den,
        images,
        heads=[probe_registry(den).parse("mid_block.attentions.0:1")],
        timestep=400,
        queries=queries,
    )
    by_string = attention_maps(
        den, images, heads=["mid_block.attentions.0:1"], timestep=400, queries=queries
    )
    batch = noisy_batch(
        den, images, np.arange(2), 400, seed=0, dataset="a"
    )  # the same inputs, made by the caller
    given = attention_maps(
        den, heads=["mid_block.attentions.0:1"], queries=queries, x_t=batch.x_t, t=batch.t
    )
    other = attention_maps(
        den, heads=["mid_block.attentions.0:1"], queries=queries, x_t=batch.x_t.flip(0), t=batch.t
    )
    for a, b, c in zip(by_address["map"], by_string["map"], given["map"]):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(a, c, atol=1e-6)
    assert not np.allclose(
        np.stack(given["map"]), np.stack(other["map"])
    )  # the maps follow the inputs given
