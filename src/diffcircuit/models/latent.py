"""Latent diffusion models: images reach the network through the pipeline's own autoencoder.

A pipeline folder with ``vae/`` (``AutoencoderKL``: Stable Diffusion, DiT, PixArt, SD3) or ``vqvae/``
(``VQModel``: LDM) whose latent channels match the network's input is a latent model. Its images are
made at the autoencoder's pixel size (the network's sample size x 2^(levels − 1)) and encoded once:

    z = (mean of the encoder's posterior − shift_factor) · scaling_factor

(the posterior *mean*, not a sample, so the latents are deterministic; VQ latents are taken before
quantisation and unscaled, as ``LDMPipeline`` decodes them). Everything the network sees (noising, ε and
x₀ errors, interventions) is then in latent units; the attention probes (edges, texture, intensity,
object masks) and the figures look at the pixels, pooled onto each layer's query grid as before.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from diffcircuit.data.spec import ImageSet, load_images
from diffcircuit.errors import ModelError

__all__ = ["LatentCodec", "model_images"]


@dataclass(frozen=True, eq=False)
class LatentCodec:
    """A pipeline's autoencoder as the network's input stage: pixels ``[B, 3, H, W]`` -> latents ``[B, C, h, w]``."""

    vae: Any  # a diffusers AutoencoderKL or VQModel (its config, encode and decode are not nn.Module's)
    scale: float
    shift: float
    factor: int  # pixels per latent cell along each side
    pixel_channels: int

    @classmethod
    def from_vae(cls, vae: Any) -> LatentCodec:
        config = vae.config
        quantised = type(vae).__name__ == "VQModel"  # LDM decodes its latents unscaled
        return cls(
            vae=vae,
            scale=1.0 if quantised else float(getattr(config, "scaling_factor", None) or 1.0),
            shift=float(getattr(config, "shift_factor", None) or 0.0),
            factor=2 ** (len(config.block_out_channels) - 1),
            pixel_channels=int(config.in_channels),
        )

    @property
    def latent_channels(self) -> int:
        return int(
            getattr(self.vae.config, "latent_channels", None) or self.vae.config.vq_embed_dim
        )

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        device = next(self.vae.parameters()).device
        out = self.vae.encode(pixels.to(device))
        z = out.latent_dist.mean if hasattr(out, "latent_dist") else out.latents
        return ((z.float() - self.shift) * self.scale).cpu()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] from latents (the inverse scaling, then the decoder)."""
        device = next(self.vae.parameters()).device
        return (
            self.vae.decode(latents.to(device) / self.scale + self.shift)
            .sample.float()
            .clamp(-1, 1)
            .cpu()
        )


def _encoded(
    codec: LatentCodec, pixels, batch_size: int, progress: Callable[[int], None] | None
) -> np.ndarray:
    chunks = []
    for lo in range(0, len(pixels), batch_size):
        batch = np.asarray(pixels[lo : lo + batch_size], dtype=np.float32)
        chunks.append(codec.encode(torch.from_numpy(batch)).numpy())
        if progress is not None:
            progress(len(batch))
    return np.concatenate(chunks)


def model_images(
    den,
    spec: str,
    *,
    n: int,
    seed: int = 0,
    skip_bad: bool = False,
    batch_size: int = 16,
    progress: Callable[[int], None] | None = None,
    gray: bool = False,
    match_to: np.ndarray | None = None,
) -> ImageSet:
    """``n`` images of ``spec`` prepared for ``den``'s network: pixels at its size and channels, or, for a latent
    model, pixels at the autoencoder's size encoded to latents (``pixels`` keeps the images). ``gray`` and
    ``match_to`` (pixels of another set) render the synthetic set grayscale or histogram-matched (``data.spec``)."""
    codec = den.codec
    if codec is None and den.in_channels not in (1, 3):
        raise ModelError(
            f"{type(den.network).__name__} takes {den.in_channels}-channel inputs, which images are "
            "not: a latent model needs its autoencoder — give its pipeline folder, the one with "
            "vae/ beside unet/ or transformer/"
        )
    if codec is None:
        return load_images(
            spec,
            n=n,
            size=den.sample_size,
            channels=den.in_channels,
            seed=seed,
            skip_bad=skip_bad,
            gray=gray,
            match_to=match_to,
        )
    pixels = load_images(
        spec,
        n=n,
        size=den.sample_size * codec.factor,
        channels=codec.pixel_channels,
        seed=seed,
        skip_bad=skip_bad,
        gray=gray,
        match_to=match_to,
    )
    latents = _encoded(codec, pixels.images, batch_size, progress)
    return dataclasses.replace(pixels, images=latents, pixels=pixels.images)
