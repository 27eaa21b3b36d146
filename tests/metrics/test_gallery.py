"""Gallery attention maps against diffusers' own explicit-softmax processor."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import DDPMScheduler
from diffusers.models.attention_processor import AttnProcessor

from diffcircuit import probe_registry
from diffcircuit.data.synthetic import synthetic_images
from diffcircuit.instrument.registry import attention_modules
from diffcircuit.metrics.gallery import attention_maps, object_queries
from diffcircuit.metrics.observe import image_noise
from diffcircuit.models.loading import Denoiser


def test_maps_equal_the_probabilities_of_diffusers_attn_processor(small_unet):
    den = Denoiser(network=small_unet, scheduler=DDPMScheduler(), model_path=".", source="t")
    images, masks, _ = synthetic_images(3, size=16, seed=4)
    registry = probe_registry(small_unet, torch.from_numpy(images[:1]), torch.zeros(1, dtype=torch.long))
    heads = [registry.parse("down_blocks.0.attentions.0:1"), registry.parse("mid_block.attentions.0:2")]
    queries = object_queries(masks, 3, 16)
    maps = attention_maps(den, images, heads=heads, timestep=300, queries=queries, dataset="a")
    # reference: diffusers' AttnProcessor materialises softmax(QKᵀ/√d) in get_attention_scores
    probs = {}
    modules = dict(attention_modules(small_unet))
    for name in ("down_blocks.0.attentions.0", "mid_block.attentions.0"):
        attn = modules[name]
        original = attn.processor
        attn.set_processor(AttnProcessor())
        get = attn.get_attention_scores

        def record(query, key, mask=None, name=name, get=get):
            probs[name] = get(query, key, mask)
            return probs[name]
        attn.get_attention_scores = record
    x0 = torch.from_numpy(images)
    eps = torch.stack([image_noise(x0.shape[1:], seed=0, dataset="a", image=i, timestep=300) for i in range(3)])
    t = torch.full((3,), 300)
    with torch.no_grad():
        small_unet(den.scheduler.add_noise(x0, eps, t), t)
    for row in maps.itertuples():
        attn = modules[row.layer]
        ref = probs[row.layer].view(3, attn.heads, *probs[row.layer].shape[1:])[row.image, row.head]
        expected = ref[row.query_y * row.grid + row.query_x].numpy()
        np.testing.assert_allclose(row.map, expected, atol=1e-5)
        assert abs(row.map.sum() - 1) < 1e-5
    # the synthetic query sits on the object (its mask is true there)
    first = maps.iloc[0]
    scale = 16 // first.grid
    assert masks[0][first.query_y * scale:(first.query_y + 1) * scale, first.query_x * scale:(first.query_x + 1) * scale].any()
