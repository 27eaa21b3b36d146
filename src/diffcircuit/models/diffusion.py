"""The DDPM forward process and the error of a denoiser's prediction: ε, and the implied x₀.

A network may predict ε, v = √ᾱ·ε − √(1−ᾱ)·x₀ (Salimans & Ho 2022) or x₀ itself (diffusers'
``prediction_type`` "epsilon", "v_prediction", "sample"); :func:`eps_from_output` turns any of
them into the ε-prediction they imply, so every error below is measured the same way.

For DDPM's forward process x_t = √ᾱ·x₀ + √(1−ᾱ)·ε, an ε-prediction ε̂ implies
x̂₀ = (x_t − √(1−ᾱ)·ε̂) / √ᾱ. At large t, ε ≈ x_t·√(1−ᾱ) is nearly free (the *trivial predictor*),
so a low ε-MSE there says little; the x₀ error is reported next to it everywhere.
"""

from __future__ import annotations

import torch

from diffcircuit.errors import ConfigError

__all__ = [
    "PREDICTION_TYPES",
    "add_noise",
    "eps_from_output",
    "eps_mse_per_image",
    "implied_x0",
    "model_device",
    "trivial_eps",
    "x0_mse_per_image",
]


PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def model_device(module: torch.nn.Module) -> torch.device:
    """Where a network's weights live: inputs are moved there, results come back to the CPU."""
    return next(module.parameters()).device


def _coeffs(
    alphas_cumprod: torch.Tensor, t: torch.Tensor, like: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """√ᾱ_t and √(1−ᾱ_t), broadcastable to the image batch ``like``, on its device: float64 on the CPU, float32
    (computed in float64 first) on an accelerator, where float64 arithmetic over whole images is slow (MPS has none)."""
    a = alphas_cumprod.to(torch.float64)[t.long().cpu()].view(-1, *([1] * (like.ndim - 1)))
    sa, sb = a.sqrt(), (1 - a).sqrt()
    if like.device.type != "cpu":
        sa, sb = sa.float(), sb.float()
    return sa.to(like.device), sb.to(like.device)


def add_noise(
    x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """x_t = √ᾱ_t·x₀ + √(1−ᾱ_t)·ε (same as diffusers' ``DDPMScheduler.add_noise``)."""
    sa, sb = _coeffs(alphas_cumprod, t, x0)
    return (sa * x0.to(sa.dtype) + sb * eps.to(sa.dtype)).to(x0.dtype)


def eps_from_output(
    output: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction_type: str = "epsilon",
) -> torch.Tensor:
    """The ε-prediction implied by a network output of the given ``prediction_type``.

    v: ε̂ = √(1−ᾱ)·x_t + √ᾱ·v̂; sample: ε̂ = (x_t − √ᾱ·x̂₀)/√(1−ᾱ). Differentiable in ``output``.
    """
    if prediction_type == "epsilon":
        return output
    sa, sb = (c.to(output.dtype) for c in _coeffs(alphas_cumprod, t, output))
    if prediction_type == "v_prediction":
        return sb * x_t.to(output.dtype) + sa * output
    if prediction_type == "sample":
        return (x_t.to(output.dtype) - sa * output) / sb
    raise ConfigError(
        f"unknown prediction_type {prediction_type!r}; expected one of {', '.join(PREDICTION_TYPES)}"
    )


def implied_x0(
    x_t: torch.Tensor, eps_hat: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """The x₀ prediction implied by an ε-prediction."""
    sa, sb = _coeffs(alphas_cumprod, t, x_t)
    return ((x_t.to(sa.dtype) - sb * eps_hat.to(sa)) / sa).to(x_t.dtype)


def trivial_eps(x_t: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The trivial ε predictor √(1−ᾱ_t)·x_t (assumes x₀ ≈ 0); strong at large t."""
    _, sb = _coeffs(alphas_cumprod, t, x_t)
    return (sb * x_t.to(sb.dtype)).to(x_t.dtype)


def eps_mse_per_image(eps_hat: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Mean squared ε error of each image: ``[batch]``."""
    return (eps_hat.float() - eps.float()).pow(2).flatten(1).mean(1)


def x0_mse_per_image(x0_hat: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """Mean squared x₀ error of each image (pixels in [-1, 1]): ``[batch]``."""
    return (x0_hat.float() - x0.float()).pow(2).flatten(1).mean(1)
