"""Denoisers: loading diffusers models safely, the one explicit forward, conditioning, noising, the embedded model."""

from diffcircuit.models.conditioning import Conditioning
from diffcircuit.models.latent import model_images
from diffcircuit.models.loading import (
    Denoiser,
    load_conditioned,
    load_denoiser,
    unconditional_input,
    use_captions,
)
from diffcircuit.models.noise import NoisyBatch, image_noise, noisy_batch, noisy_batches
from diffcircuit.models.spec import ModelSpec

__all__ = [
    "Conditioning",
    "Denoiser",
    "ModelSpec",
    "NoisyBatch",
    "image_noise",
    "load_conditioned",
    "load_denoiser",
    "model_images",
    "noisy_batch",
    "noisy_batches",
    "unconditional_input",
    "use_captions",
]
