"""The disk-spilling activation cache: batches written as safetensors shards read back equal to an in-memory
capture of the same noisy inputs, for all images or a slice."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from diffcircuit import Denoiser, DiffcircuitError, instrument, probe_registry
from diffcircuit.data.synthetic import synthetic_images
from diffcircuit.models.diffusion import add_noise
from diffcircuit.models.noise import batch_noise
from diffcircuit.protocol.activations import ActivationCache, cache_activations


def test_cached_shards_read_back_as_the_in_memory_capture(small_unet, tmp_path):
    den = Denoiser(network=small_unet, scheduler=DDPMScheduler(), model_path=".", source="t")
    images = synthetic_images(5, size=16, seed=2)[0]
    registry = probe_registry(
        small_unet, torch.from_numpy(images[:1]), torch.zeros(1, dtype=torch.long)
    )
    layer = registry.layers[0].layer
    cache = cache_activations(
        den, images, tmp_path / "cache", timesteps=[100, 700], batch_size=2, seed=4, dataset="a"
    )
    assert len(cache.files(100)) == 3 and cache.layers == [i.layer for i in registry.layers]
    x0 = torch.from_numpy(images)
    eps = batch_noise(x0.shape[1:], seed=4, dataset="a", images=range(5), timestep=700)
    t = torch.full((5,), 700)
    with torch.no_grad(), instrument(small_unet, registry=registry, cache_heads=[layer]) as session:
        small_unet(add_noise(x0, eps, t, den.alphas_cumprod), t)
    expected = session.pop("head_out")[layer]
    reopened = ActivationCache(tmp_path / "cache")  # a fresh reader of the directory
    torch.testing.assert_close(reopened.layer(layer, 700), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        reopened.layer(layer, 700, slice(1, 4)), expected[1:4], atol=1e-5, rtol=1e-5
    )
    assert not torch.allclose(
        reopened.layer(layer, 100), expected, atol=1e-3
    )  # another timestep, other values
    with pytest.raises(DiffcircuitError, match="not cached"):
        reopened.layer("nope", 700)
    assert not list((tmp_path / "cache").glob(".*.tmp"))


def test_the_cache_command_writes_shards_and_refuses_bad_input_in_one_line(
    small_model_dir, tmp_path, capsys
):
    from diffcircuit.cli import main

    out = tmp_path / "cache"
    assert (
        main(
            [
                "cache",
                "--out",
                str(out),
                "--model",
                str(small_model_dir),
                "--data",
                "synthetic",
                "--n",
                "3",
                "--timesteps",
                "20,900",
                "--batch-size",
                "2",
                "--layer",
                "mid_block.attentions.0",
            ]
        )
        == 0
    )
    cache = ActivationCache(out)
    assert cache.layers == ["mid_block.attentions.0"] and len(cache.files(900)) == 2
    assert cache.layer("mid_block.attentions.0", 20).shape[0] == 3
    capsys.readouterr()
    for args, words in (
        (["--layer", "nope"], "no attention layer"),
        (["--timesteps", "5000"], "outside"),
    ):
        assert (
            main(
                [
                    "cache",
                    "--out",
                    str(tmp_path / "bad"),
                    "--model",
                    str(small_model_dir),
                    "--n",
                    "2",
                    *args,
                ]
            )
            != 0
        )
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err
        assert not (tmp_path / "bad").exists()
