from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from skimage.metrics import structural_similarity

from diffcircuit import probe_registry
from diffcircuit.interventions.ablation import targets
from diffcircuit.interventions.sampling import sample_images, sampling_effect
from diffcircuit.models.loading import Denoiser


@pytest.fixture
def den(small_unet):
    return Denoiser(network=small_unet, scheduler=DDPMScheduler(), model_path=".", source="t")


def _layer(den):
    registry = probe_registry(den.network, torch.zeros(1, 3, 16, 16), torch.zeros(1, dtype=torch.long))
    return targets(registry, "layer")[2]


def test_sampling_is_seeded_and_an_empty_window_changes_nothing(den):
    a = sample_images(den, n=2, steps=5, seed=3)
    assert torch.equal(a, sample_images(den, n=2, steps=5, seed=3))
    target = _layer(den)
    untouched = sample_images(den, n=2, steps=5, seed=3, target=target, window=(2000, 3000))  # no step inside
    assert torch.equal(a, untouched)
    touched = sample_images(den, n=2, steps=5, seed=3, target=target)
    assert not torch.equal(a, touched)


def test_window_limits_where_the_intervention_acts(den):
    target = _layer(den)
    late = sampling_effect(den, target, n=2, steps=5, seed=1, window=(0, 300))
    every = sampling_effect(den, target, n=2, steps=5, seed=1)
    assert (every.pixel_mse > 0).all() and (late.pixel_mse > 0).all()
    assert not np.allclose(late.pixel_mse, every.pixel_mse)
    # SSIM is skimage's with Wang et al.'s settings, recomputed here
    clean = sample_images(den, n=2, steps=5, seed=1)
    ablated = sample_images(den, n=2, steps=5, seed=1, target=target)
    a, b = ((clean[0].numpy() + 1) / 2).transpose(1, 2, 0), ((ablated[0].numpy() + 1) / 2).transpose(1, 2, 0)
    expected = structural_similarity(a, b, channel_axis=-1, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                     use_sample_covariance=False)
    assert every.ssim.iloc[0] == pytest.approx(expected)
