from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
from diffusers import DDPMScheduler

from diffcircuit import Denoiser, observe
from diffcircuit.data.synthetic import synthetic_images
from diffcircuit.models.noise import image_noise


def _denoiser(unet, tmp_path):
    return Denoiser(
        network=unet,
        scheduler=DDPMScheduler(num_train_timesteps=1000),
        model_path=tmp_path,
        source="test",
    )


def test_noise_depends_only_on_the_images_identity():
    a = image_noise((3, 4, 4), seed=0, dataset="a", image=5, timestep=100)
    long1 = image_noise((3, 4, 4), seed=0, dataset="abcdefgh1", image=5, timestep=100)
    assert not torch.equal(
        long1, image_noise((3, 4, 4), seed=0, dataset="abcdefgh2", image=5, timestep=100)
    )
    assert torch.equal(a, image_noise((3, 4, 4), seed=0, dataset="a", image=5, timestep=100))
    for other in (
        dict(seed=1),
        dict(dataset="b"),
        dict(image=6),
        dict(timestep=101),
        dict(dataset="abcdefgh1"),
    ):
        kw = dict(seed=0, dataset="a", image=5, timestep=100) | other
        assert not torch.equal(a, image_noise((3, 4, 4), **kw))


def test_results_do_not_depend_on_batch_size(small_unet, tmp_path):
    den = _denoiser(small_unet, tmp_path)
    images = synthetic_images(5, size=16, seed=0)[0]
    h1, i1 = observe(den, images, timesteps=[50, 700], batch_size=5)
    h2, i2 = observe(den, images, timesteps=[50, 700], batch_size=2)
    key = ["image", "timestep", "layer", "head"]
    h1, h2 = h1.sort_values(key).reset_index(drop=True), h2.sort_values(key).reset_index(drop=True)
    np.testing.assert_allclose(h1.entropy_nats, h2.entropy_nats, atol=1e-5)
    np.testing.assert_allclose(
        i1.sort_values(["image", "timestep"]).eps_mse,
        i2.sort_values(["image", "timestep"]).eps_mse,
        rtol=1e-5,
    )


def test_tables_are_tidy_and_consistent(small_unet, tmp_path):
    den = _denoiser(small_unet, tmp_path)
    images = synthetic_images(3, size=16, seed=0)[0]
    heads, per_image = observe(den, images, timesteps=[10, 990], dataset="b")
    n_heads = sum(m.heads for m in small_unet.modules() if type(m).__name__ == "Attention")
    assert len(heads) == 3 * 2 * n_heads and len(per_image) == 3 * 2
    assert not heads.duplicated(["image", "timestep", "layer", "head"]).any()
    assert (heads.dataset == "b").all()
    np.testing.assert_allclose(heads.entropy_norm, heads.entropy_nats / np.log(heads.n_keys))
    # eps_mse in the head table is the image's own, and it equals an independent recomputation
    row = per_image.iloc[0]
    x0 = torch.from_numpy(images[int(row.image)])[None]
    eps = image_noise(
        x0.shape[1:], seed=0, dataset="b", image=int(row.image), timestep=int(row.timestep)
    )[None]
    sched = den.scheduler
    t = torch.tensor([int(row.timestep)])
    with torch.no_grad():
        pred = small_unet(sched.add_noise(x0, eps, t), t).sample
    assert math.isclose(row.eps_mse, torch.mean((pred - eps) ** 2).item(), rel_tol=1e-4)


def test_v_prediction_models_are_scored_by_the_eps_they_imply(small_unet, tmp_path):
    sched = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    den = Denoiser(network=small_unet, scheduler=sched, model_path=tmp_path, source="test")
    images = synthetic_images(2, size=16, seed=0)[0]
    _, per_image = observe(den, images, timesteps=[900], dataset="a")
    row = per_image.iloc[1]
    x0 = torch.from_numpy(images[int(row.image)])[None]
    eps = image_noise(x0.shape[1:], seed=0, dataset="a", image=int(row.image), timestep=900)[None]
    t = torch.tensor([900])
    x_t = sched.add_noise(x0, eps, t)
    with torch.no_grad():
        v_hat = small_unet(x_t, t).sample
    # independent: v = √ᾱ·ε − √(1−ᾱ)·x₀ and x_t = √ᾱ·x₀ + √(1−ᾱ)·ε give ε − ε̂ = √ᾱ·(v − v̂)
    a = sched.alphas_cumprod[900]
    v = sched.get_velocity(x0, eps, t)
    assert math.isclose(row.eps_mse, (a * (v - v_hat) ** 2).mean().item(), rel_tol=1e-3)
    x0_hat = a.sqrt() * x_t - (1 - a).sqrt() * v_hat
    assert math.isclose(row.x0_mse, ((x0_hat - x0) ** 2).mean().item(), rel_tol=1e-3)


def test_an_image_set_brings_its_masks_and_the_result_is_typed(small_unet, tmp_path):
    from diffcircuit import load_images
    from diffcircuit.metrics.observe import Observation

    den = _denoiser(small_unet, tmp_path)
    syn = load_images("synthetic", n=3, size=16, channels=3)
    obs = observe(den, syn, timesteps=[100])
    assert isinstance(obs, Observation)
    heads, images = observe(den, syn.images, timesteps=[100], masks=syn.masks)  # as before: unpacks
    pd.testing.assert_frame_equal(obs.heads, heads)
    pd.testing.assert_frame_equal(obs.images, images)
    assert obs.heads.object_affinity.notna().all()  # the set's masks reached the object probes
