"""Latent models: images reach the network through the pipeline's autoencoder (``models.latent``).

Pipeline folders with a tiny ``vae/`` (AutoencoderKL, with a scaling and a shift factor) or ``vqvae/``
(VQModel), loaded through ``from_pretrained`` as a user's Stable Diffusion / DiT / LDM folder would be;
latents are checked against diffusers' encoder called directly.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffcircuit import DiffcircuitError, load_denoiser, load_images, model_images


def latent_folder(
    root, make_autoencoder, kind: str = "vae", latent_channels: int = 4, unet_channels: int = 4
):
    """An LDM-style pipeline folder: a 16x16 UNet2DModel on the latents of a 32x32 autoencoder."""
    from diffusers import DDPMScheduler, UNet2DModel

    make_autoencoder(kind, latent_channels).save_pretrained(root / kind, safe_serialization=True)
    torch.manual_seed(1)
    UNet2DModel(
        sample_size=16,
        in_channels=unet_channels,
        out_channels=unet_channels,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        attention_head_dim=8,
        norm_num_groups=8,
    ).save_pretrained(root / "unet", safe_serialization=True)
    DDPMScheduler(num_train_timesteps=1000, clip_sample=False).save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "LDMPipeline",
                "unet": ["diffusers", "UNet2DModel"],
                kind: ["diffusers", "VQModel" if kind == "vqvae" else "AutoencoderKL"],
                "scheduler": ["diffusers", "DDPMScheduler"],
            }
        )
    )
    return root


@pytest.mark.parametrize("kind", ["vae", "vqvae"])
def test_images_are_made_at_the_autoencoders_size_and_encoded_as_diffusers_encodes_them(
    tmp_path, autoencoder, kind
):
    folder = latent_folder(tmp_path / kind, autoencoder, kind)
    den = load_denoiser(str(folder))
    assert den.image_size == 32 and den.sample_size == 16
    images = model_images(den, "synthetic", n=3, seed=4)
    pixels = load_images("synthetic", n=3, size=32, channels=3, seed=4).images
    np.testing.assert_array_equal(np.asarray(images.pixels), np.asarray(pixels))
    ae = autoencoder(kind, 4).eval()  # the same seeded weights, built directly
    with torch.no_grad():
        encoded = ae.encode(torch.from_numpy(np.asarray(pixels)))
    expected = (
        (encoded.latent_dist.mean - 0.1) * 0.5 if kind == "vae" else encoded.latents
    )  # VQ: unscaled, pre-quantisation
    assert images.images.shape == (3, 4, 16, 16)
    np.testing.assert_allclose(images.images, expected.numpy(), atol=1e-5)
    assert (
        images.fingerprint == load_images("synthetic", n=3, size=32, channels=3, seed=4).fingerprint
    )  # the pixels


def test_an_autoencoder_whose_latents_do_not_fit_the_network_is_refused(tmp_path, autoencoder):
    folder = latent_folder(tmp_path / "bad", autoencoder, latent_channels=4, unet_channels=8)
    with pytest.raises(DiffcircuitError, match="4-channel latents but the network takes 8"):
        load_denoiser(str(folder))


def test_samples_of_a_latent_model_are_decoded_to_pixels(tmp_path, autoencoder):
    from diffcircuit.interventions.sampling import sample_images

    den = load_denoiser(str(latent_folder(tmp_path / "ldm", autoencoder, "vqvae")))
    samples = sample_images(den, n=2, steps=3, seed=0)
    assert samples.shape == (2, 3, 32, 32) and samples.abs().max() <= 1


def test_a_pipelines_network_subfolder_is_read_with_the_pipelines_scheduler_and_autoencoder(
    tmp_path, autoencoder
):
    from diffusers import DDPMScheduler

    folder = latent_folder(tmp_path / "ldm", autoencoder)
    DDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012
    ).save_pretrained(folder / "scheduler")
    whole, part = load_denoiser(str(folder)), load_denoiser(str(folder / "unet"))
    assert part.codec is not None and part.image_size == whole.image_size == 32
    torch.testing.assert_close(part.alphas_cumprod, whole.alphas_cumprod)  # not the DDPM default's
    assert not torch.allclose(part.alphas_cumprod, DDPMScheduler().alphas_cumprod)
