"""Rectified-flow denoisers (SD3, ``FlowMatchEulerDiscreteScheduler``) seen through the DDPM lens exactly.

A flow model is trained on x_σ = (1−σ)·x₀ + σ·ε and predicts the velocity v = ε − x₀. That process
is the DDPM one, x_t = √ᾱ·x₀ + √(1−ᾱ)·ε, up to a scale of the input:

    x_σ = c·x_t   with   ᾱ = (1−σ)² / ((1−σ)² + σ²),   c = √((1−σ)² + σ²),

and a velocity implies the ε-prediction ε̂ = x_σ + (1−σ)·v̂ (then x̂₀ = x_σ − σ·v̂, as the flow has it).
So a flow network read through ``FlowAdapter`` — its input multiplied by c, its timestep replaced by
σ·N, its velocity turned into ε̂ (``Denoiser.predict`` does this on every call) — *is* an ε-predicting DDPM denoiser with the schedule ``flow_betas``,
and every analysis (noising, ε and x₀ errors, the trivial predictor, DDIM sampling) applies unchanged
and measures the flow model's own prediction. Timestep index t ∈ 0..N−1 is the scheduler's training
grid σ_t = shift·s/(1 + (shift−1)·s), s = (t+1)/N; t = N−1 is pure noise (σ = 1, ᾱ = 0), where x₀
cannot be inferred, so it is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from diffcircuit.errors import ModelError

__all__ = ["FlowAdapter", "flow_betas", "flow_sigmas", "is_flow_matching"]


def is_flow_matching(scheduler_config: dict) -> bool:
    return str(scheduler_config.get("_class_name", "")).startswith("FlowMatch")


def flow_sigmas(scheduler_config: dict, image_tokens: int | None = None) -> torch.Tensor:
    """σ_t for t = 0..N−1 (ascending, float64), the scheduler's grid: a fixed shift (SD3), or the shift Flux's
    pipeline derives from the number of image tokens (``use_dynamic_shifting``: μ linear in ``image_tokens``)."""
    if any(
        scheduler_config.get(k)
        for k in (
            "use_karras_sigmas",
            "use_exponential_sigmas",
            "use_beta_sigmas",
            "invert_sigmas",
            "shift_terminal",
        )
    ):
        raise ModelError(
            "this flow-matching scheduler uses a non-default σ grid, which diffcircuit does not map yet"
        )
    n = int(scheduler_config.get("num_train_timesteps", 1000))
    s = torch.arange(1, n + 1, dtype=torch.float64) / n
    if not scheduler_config.get("use_dynamic_shifting"):
        shift = float(scheduler_config.get("shift", 1.0))
        return shift * s / (1 + (shift - 1) * s)
    if image_tokens is None:
        raise ModelError(
            "this flow-matching scheduler shifts σ by image size (use_dynamic_shifting), which "
            "diffcircuit reads from a packed (Flux-style) model and its autoencoder"
        )
    lo, hi = (
        scheduler_config.get("base_image_seq_len", 256),
        scheduler_config.get("max_image_seq_len", 4096),
    )
    base, top = scheduler_config.get("base_shift", 0.5), scheduler_config.get("max_shift", 1.15)
    mu = base + (top - base) * (image_tokens - lo) / (hi - lo)  # FluxPipeline's calculate_shift
    if scheduler_config.get("time_shift_type", "exponential") == "linear":
        return mu / (mu + (1 / s - 1))
    return math.exp(mu) / (math.exp(mu) + (1 / s - 1))


def flow_betas(sigmas: torch.Tensor) -> torch.Tensor:
    """DDPM betas whose ᾱ_t = (1−σ_t)² / ((1−σ_t)² + σ_t²): β_t = 1 − ᾱ_t / ᾱ_{t−1}."""
    acp = (1 - sigmas) ** 2 / ((1 - sigmas) ** 2 + sigmas**2)
    previous = torch.cat([torch.ones(1, dtype=acp.dtype), acp[:-1]])
    return 1 - acp / previous


@dataclass(frozen=True)
class FlowAdapter:
    """A velocity-predicting flow network read as the ε-predicting DDPM it equals (module docstring): its input
    is c·x_t, its timestep input σ_t·``timestep_scale`` (N, as SD3 takes it; 1 for Flux, which scales σ itself),
    and its velocity v̂ gives ε̂ = c·x_t + (1−σ_t)·v̂."""

    sigmas: torch.Tensor  # σ_t for t = 0..N−1, float64
    timestep_scale: float

    def inputs(
        self, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x_σ, timestep input, σ)``: the flow model's input ``[B, C, H, W]`` for DDPM's ``x_t`` at index ``t``."""
        sigma = (
            self.sigmas.float().to(x_t.device)[t.long()].view(-1, *([1] * (x_t.ndim - 1)))
        )  # [B, 1, 1, 1]
        scale = ((1 - sigma) ** 2 + sigma**2).sqrt()
        return (
            x_t * scale.to(x_t.dtype),
            (sigma.flatten() * self.timestep_scale).to(x_t.dtype),
            sigma,
        )

    @staticmethod
    def eps(x_flow: torch.Tensor, sigma: torch.Tensor, velocity: torch.Tensor) -> torch.Tensor:
        """ε̂ = x_σ + (1−σ)·v̂ (a learned-variance half of the output, if any, is dropped)."""
        v = velocity[:, : x_flow.shape[1]]
        return x_flow.to(v.dtype) + (1 - sigma).to(v.dtype) * v
