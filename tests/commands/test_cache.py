"""``diffcircuit cache``'s workflow (``run_cache``): the chosen layers' per-head outputs, read back from disk,
equal the input of each layer's output projection in a plain forward of the same noisy images."""

from __future__ import annotations

import pytest
import torch

from diffcircuit import load_denoiser, model_images
from diffcircuit.commands.cache import CacheConfig, run_cache
from diffcircuit.errors import InputError
from diffcircuit.models.noise import noisy_batch

T = 300


def _head_outputs_by_hand(den, x0, layer: str) -> torch.Tensor:
    """``[n, heads, queries, head_dim]``: what enters ``to_out[0]`` (the merged heads), split back by head."""
    attn = dict(den.network.named_modules())[layer]
    seen = []
    handle = attn.to_out[0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        b = noisy_batch(den, x0, range(len(x0)), T, seed=4, dataset="a")
        with torch.no_grad():
            den.predict(b.x_t, b.t, rows=b.which)
    finally:
        handle.remove()
    merged = seen[0]  # [n, queries, heads * head_dim]
    return merged.view(len(x0), merged.shape[1], attn.heads, -1).transpose(1, 2)


def test_cached_heads_equal_the_output_projections_input(small_model_dir, tmp_path):
    cfg = CacheConfig(
        model=str(small_model_dir),
        data="synthetic",
        n=3,
        timesteps=(T,),
        layers=("mid_block.attentions.0",),
        batch_size=2,
        seed=4,
    )
    done = []
    cache = run_cache(cfg, tmp_path / "cache", progress=done.append)
    assert cache.layers == ["mid_block.attentions.0"] and sum(done) == 3
    assert len(cache.files(T)) == 2  # batches of 2 and 1 images
    den = load_denoiser(small_model_dir)
    x0 = model_images(den, "synthetic", n=3, seed=4).images
    expected = _head_outputs_by_hand(den, x0, "mid_block.attentions.0")
    got = cache.layer("mid_block.attentions.0", T)
    assert got.shape == expected.shape
    torch.testing.assert_close(got.float(), expected.float(), rtol=1e-4, atol=1e-5)


def test_the_cache_goes_into_a_new_directory(small_model_dir, tmp_path):
    (tmp_path / "cache").mkdir()
    cfg = CacheConfig(model=str(small_model_dir), data="synthetic", n=1)
    with pytest.raises(InputError, match="exists"):
        run_cache(cfg, tmp_path / "cache")
