from __future__ import annotations

import torch
from diffusers import DDPMScheduler

from diffcircuit.models.diffusion import add_noise, eps_mse_per_image, implied_x0, trivial_eps


def test_add_noise_matches_diffusers_and_x0_inverts_it():
    sched = DDPMScheduler(num_train_timesteps=1000)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.rand(5, 3, 8, 8, generator=g) * 2 - 1, torch.randn(5, 3, 8, 8, generator=g)
    t = torch.tensor([0, 10, 500, 900, 999])
    x_t = add_noise(x0, eps, t, sched.alphas_cumprod)
    torch.testing.assert_close(x_t, sched.add_noise(x0, eps, t), atol=1e-5, rtol=0)
    torch.testing.assert_close(implied_x0(x_t, eps, t, sched.alphas_cumprod), x0, atol=2e-3, rtol=0)


def test_trivial_predictor_error_is_about_alpha_bar_times_signal_power():
    sched = DDPMScheduler(num_train_timesteps=1000)
    g = torch.Generator().manual_seed(1)
    x0, eps = (
        torch.rand(64, 3, 16, 16, generator=g) * 2 - 1,
        torch.randn(64, 3, 16, 16, generator=g),
    )
    t = torch.full((64,), 900)
    a = sched.alphas_cumprod[900].item()
    x_t = add_noise(x0, eps, t, sched.alphas_cumprod)
    mse = eps_mse_per_image(trivial_eps(x_t, t, sched.alphas_cumprod), eps).mean().item()
    # error = -ᾱ·ε + √(ᾱ(1-ᾱ))·x₀, so MSE ≈ ᾱ(1-ᾱ)·E[x₀²] + ᾱ²   (E[x₀²] = 1/3 for U(-1, 1))
    expected = a * (1 - a) / 3 + a * a
    assert abs(mse - expected) / expected < 0.05


def test_v_and_sample_outputs_imply_the_true_eps():
    # v from diffusers' own get_velocity, x₀ from the data: both must give back the ε that made x_t
    from diffcircuit.models.diffusion import eps_from_output

    sched = DDPMScheduler(num_train_timesteps=1000)
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.rand(4, 3, 8, 8, generator=g) * 2 - 1, torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([1, 300, 700, 999])
    x_t = sched.add_noise(x0, eps, t)
    v = sched.get_velocity(x0, eps, t)
    acp = sched.alphas_cumprod
    torch.testing.assert_close(
        eps_from_output(v, x_t, t, acp, "v_prediction"), eps, atol=1e-5, rtol=0
    )
    torch.testing.assert_close(eps_from_output(x0, x_t, t, acp, "sample"), eps, atol=1e-4, rtol=0)
    torch.testing.assert_close(eps_from_output(eps, x_t, t, acp, "epsilon"), eps)


def test_unknown_prediction_type_is_refused():
    import pytest

    from diffcircuit.models.diffusion import eps_from_output

    sched = DDPMScheduler(num_train_timesteps=1000)
    x = torch.zeros(1, 3, 4, 4)
    with pytest.raises(ValueError, match="prediction_type"):
        eps_from_output(x, x, torch.tensor([5]), sched.alphas_cumprod, "flow")
