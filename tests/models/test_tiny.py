"""The embedded model: the training command keeps working, and the shipped weights are good."""

from __future__ import annotations

import json

import pytest
import torch

from diffcircuit import load_denoiser
from diffcircuit.data.faces import lfw_images
from diffcircuit.data.synthetic import synthetic_images
from diffcircuit.models.tiny import FACES_TRAIN, TrainConfig, train_tiny


def test_train_tiny_few_steps_writes_a_loadable_model(tmp_path):
    cfg = TrainConfig(steps=3, batch_size=4, synthetic_pool=8, warmup_steps=1, log_every=1, quality_images=4)
    out = train_tiny(tmp_path / "m", cfg)
    den = load_denoiser(str(out))
    assert (out / "README.md").read_text().count("| synthetic |") == 3
    quality = json.loads((out / "quality.json").read_text())
    assert {(q["dataset"], q["timestep"]) for q in quality} == {(d, t) for d in ("synthetic", "faces") for t in (100, 500, 900)}
    # the same seed gives the same weights
    again = load_denoiser(str(train_tiny(tmp_path / "m2", cfg)))
    assert all(torch.equal(a, b) for a, b in zip(den.network.parameters(), again.network.parameters()))


def _held_out():
    synth = torch.from_numpy(synthetic_images(100, seed=0)[0])
    faces = torch.from_numpy(lfw_images("faces")[FACES_TRAIN:])
    return {"synthetic": synth, "faces": faces}


@pytest.mark.parametrize("timestep", [100, 500, 900])
def test_shipped_model_beats_the_trivial_predictor_on_held_out_images(timestep):
    """Computed independently of the package's metrics: diffusers' add_noise and a plain MSE."""
    den = load_denoiser()
    sched = den.scheduler
    for name, x0 in _held_out().items():
        g = torch.Generator().manual_seed(777 + timestep)
        eps = torch.randn(x0.shape, generator=g)
        t = torch.full((len(x0),), timestep, dtype=torch.long)
        x_t = sched.add_noise(x0, eps, t)
        with torch.no_grad():
            out = den.network(x_t, t).sample
        a = sched.alphas_cumprod[timestep]
        kind = sched.config.prediction_type
        # the ε an output implies (v = √ᾱ·ε − √(1−ᾱ)·x₀, so ε = √(1−ᾱ)·x_t + √ᾱ·v), written out here
        pred = {"epsilon": out, "v_prediction": (1 - a).sqrt() * x_t + a.sqrt() * out}[kind]
        mse = torch.mean((pred - eps) ** 2).item()
        trivial = torch.mean(((1 - sched.alphas_cumprod[timestep]).sqrt() * x_t - eps) ** 2).item()
        assert mse < trivial, (name, mse, trivial)
        if timestep == 500:
            assert mse < 0.02, (name, mse)


def test_fine_tuning_starts_from_the_given_weights(tmp_path):
    from diffcircuit.models.tiny import build_tiny_unet
    from diffcircuit.models.loading import save_denoiser
    from diffusers import DDPMScheduler

    base = build_tiny_unet(seed=5)
    save_denoiser(tmp_path / "base", base, DDPMScheduler())
    cfg = TrainConfig(steps=1, batch_size=2, synthetic_pool=2, warmup_steps=1, quality_images=2, lr=1e-12,
                      init_from=str(tmp_path / "base"))
    tuned = load_denoiser(str(train_tiny(tmp_path / "tuned", cfg))).network
    for a, b in zip(base.parameters(), tuned.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)  # lr ~ 0: still the starting weights
    assert "--init-from" in (tmp_path / "tuned" / "README.md").read_text()
