"""Rectified-flow denoisers (SD3, ``FlowMatchEulerDiscreteScheduler``) seen through the DDPM lens exactly.

A flow model is trained on x_σ = (1−σ)·x₀ + σ·ε and predicts the velocity v = ε − x₀. That process
is the DDPM one, x_t = √ᾱ·x₀ + √(1−ᾱ)·ε, up to a scale of the input:

    x_σ = c·x_t   with   ᾱ = (1−σ)² / ((1−σ)² + σ²),   c = √((1−σ)² + σ²),

and a velocity implies the ε-prediction ε̂ = x_σ + (1−σ)·v̂ (then x̂₀ = x_σ − σ·v̂, as the flow has it).
So a flow network wrapped by ``attach_flow`` — its input multiplied by c, its timestep replaced by
σ·N, its velocity turned into ε̂ — *is* an ε-predicting DDPM denoiser with the schedule ``flow_betas``,
and every analysis (noising, ε and x₀ errors, the trivial predictor, DDIM sampling) applies unchanged
and measures the flow model's own prediction. Timestep index t ∈ 0..N−1 is the scheduler's training
grid σ_t = shift·s/(1 + (shift−1)·s), s = (t+1)/N; t = N−1 is pure noise (σ = 1, ᾱ = 0), where x₀
cannot be inferred, so it is refused.
"""

from __future__ import annotations

import math

import torch

from diffcircuit.errors import DiffcircuitError

__all__ = ["attach_flow", "flow_betas", "flow_sigmas", "is_flow_matching"]


def is_flow_matching(scheduler_config: dict) -> bool:
    return str(scheduler_config.get("_class_name", "")).startswith("FlowMatch")


def flow_sigmas(scheduler_config: dict, image_tokens: int | None = None) -> torch.Tensor:
    """σ_t for t = 0..N−1 (ascending, float64), the scheduler's grid: a fixed shift (SD3), or the shift Flux's
    pipeline derives from the number of image tokens (``use_dynamic_shifting``: μ linear in ``image_tokens``)."""
    if any(scheduler_config.get(k) for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                                              "invert_sigmas", "shift_terminal")):
        raise DiffcircuitError("this flow-matching scheduler uses a non-default σ grid, which diffcircuit does not map yet")
    n = int(scheduler_config.get("num_train_timesteps", 1000))
    s = torch.arange(1, n + 1, dtype=torch.float64) / n
    if not scheduler_config.get("use_dynamic_shifting"):
        shift = float(scheduler_config.get("shift", 1.0))
        return shift * s / (1 + (shift - 1) * s)
    if image_tokens is None:
        raise DiffcircuitError("this flow-matching scheduler shifts σ by image size (use_dynamic_shifting), which "
                               "diffcircuit reads from a packed (Flux-style) model and its autoencoder")
    lo, hi = scheduler_config.get("base_image_seq_len", 256), scheduler_config.get("max_image_seq_len", 4096)
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


def attach_flow(network: torch.nn.Module, sigmas: torch.Tensor, timestep_scale: float | None = None) -> None:
    """Make ``network`` (a velocity predictor) take DDPM inputs (x_t, t index) and return ε̂ (module docstring).

    Its timestep input is σ·``timestep_scale`` (default N, as SD3 takes it; Flux takes σ and scales it itself).
    Two hooks on the network itself, so module paths (head addresses) stay the network's own."""
    n = float(len(sigmas) if timestep_scale is None else timestep_scale)
    table = sigmas.float()

    def split(args, kwargs):
        """(sample, timestep) wherever the call put them: ``net(x, t)`` or by name (conditioning passes t by name)."""
        sample = args[0] if args else kwargs["hidden_states"]
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        return sample, t

    def before(module, args, kwargs):
        sample, t = split(args, kwargs)
        sigma = table.to(sample.device)[t.long()].view(-1, *([1] * (sample.ndim - 1)))
        scale = ((1 - sigma) ** 2 + sigma**2).sqrt()
        x_flow = sample * scale.to(sample.dtype)
        args = (x_flow, *args[1:]) if args else args
        kwargs = kwargs if args else {**kwargs, "hidden_states": x_flow}
        kwargs = {**kwargs, "timestep": (sigma.flatten() * n).to(sample.dtype)}
        return args[:1] if len(args) > 1 else args, kwargs

    def after(module, args, kwargs, output):
        x_flow = args[0] if args else kwargs["hidden_states"]
        sigma = (kwargs["timestep"].float() / n).view(-1, *([1] * (x_flow.ndim - 1)))
        v = output.sample if hasattr(output, "sample") else output[0]
        eps = x_flow.to(v.dtype) + (1 - sigma).to(v.dtype) * v[:, : x_flow.shape[1]]
        if hasattr(output, "sample"):
            return type(output)(sample=eps)
        return (eps, *output[1:])

    network.register_forward_pre_hook(before, with_kwargs=True)
    network.register_forward_hook(after, with_kwargs=True)
