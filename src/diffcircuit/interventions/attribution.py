"""Attribution patching: estimate every head's ablation effect from gradients.

For image i, head h with clean output slice a (before the output projection) and ablated value a'
(0 for zero ablation, the reference mean for mean ablation), the effect on the image's ε-MSE L_i is

- first order:   ΔL ≈ (a' − a) · ∂L/∂a |_clean                  (1 forward + 1 backward per batch)
- integrated gradients (EAP-IG style):  ΔL ≈ (a' − a) · mean_k ∂L/∂a |_{a + α_k (a' − a)}, with
  α_k = (k + ½)/m, every head shifted along the path together (m more forwards and backwards).
- Gauss-Newton ("+gn"): L is a mean of squares, L = ‖ε̂ − ε‖²/P, so with Δε̂ ≈ J·Δa exactly
  ΔL ≈ 2(ε̂ − ε)·JΔa/P + ‖JΔa‖²/P. The first term is the first-order score; the second, which
  dominates when the model is accurate (small ε̂ − ε, e.g. at large t), is estimated for every head
  at once from K random probes z ~ N(0, I) in output space: E[(zᵀJΔa)²] = ‖JΔa‖², and zᵀJ is one
  backward pass (K more backwards on the same forward).

Gradients are total derivatives taken on the head outputs themselves (no activation is frozen), so
an early head's score includes its effect through the heads after it.

Images do not interact in the forward pass (GroupNorm is per sample), so one backward of the
batch's summed loss gives each image's own gradient. Scores are reported as predicted
``degradation_pct`` = 100 · ΔL / L_clean, comparable with ``ablation_sweep``'s exhaustive values.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import torch

from diffcircuit.instrument.registry import HeadRegistry
from diffcircuit.instrument.session import instrument, probe_registry
from diffcircuit.interventions.sweep import ActivationMoments, clean_activations
from diffcircuit.metrics.observe import batch_noise
from diffcircuit.models.conditioning import images_of
from diffcircuit.models.diffusion import add_noise, eps_mse_per_image, model_device

__all__ = ["attribution_scores"]


def _graded_pass(net, registry, x_t, t, eps, to_eps, shifts: dict[str, torch.Tensor] | None = None,
                 probes: int = 0, probe_seed: int = 0):
    """One forward and backward: each layer's head outputs (after ``shifts``), ∂(Σ_i L_i)/∂ them and
    the clean per-image loss; plus, per probe k, ∂(Σ_i z_ik · ε̂_i)/∂ them for seeded z_ik ~ N(0, I).

    The gradients are total derivatives: later heads keep responding to earlier ones.
    """
    layers = [i.layer for i in registry.layers]
    with torch.enable_grad(), instrument(net, registry=registry, cache_heads=layers, shifts=shifts, keep_graph=True) as session:
        eps_hat = to_eps(net(x_t, t).sample, x_t, t)
        cached = session.pop("head_out")
        outs = [cached[layer] for layer in layers]  # [B, h, Q, d] each, attached to the graph
        loss_per_image = eps_mse_per_image(eps_hat, eps)
        grads = torch.autograd.grad(loss_per_image.sum(), outs, retain_graph=probes > 0)
        gen = torch.Generator().manual_seed(probe_seed)
        probe_grads = []
        for k in range(probes):
            z = torch.randn(eps_hat.shape, generator=gen).to(eps_hat)
            probe_grads.append(dict(zip(layers, torch.autograd.grad((z * eps_hat).sum(), outs, retain_graph=k < probes - 1))))
    values = {layer: out.detach() for layer, out in zip(layers, outs)}
    return values, dict(zip(layers, grads)), loss_per_image.detach(), probe_grads


def _batch_scores(net, registry, x_t, t, eps, to_eps, ablated: Callable[[str, torch.Tensor], torch.Tensor],
                  ig_steps: int, probes: int = 0, probe_seed: int = 0):
    """Per layer ``[B, h]`` predicted ΔL, and the clean per-image loss ``[B]``."""
    clean, grads, loss, probe_grads = _graded_pass(net, registry, x_t, t, eps, to_eps, probes=probes, probe_seed=probe_seed)
    delta = {layer: ablated(layer, a) - a for layer, a in clean.items()}
    if ig_steps > 0:
        grads = {layer: torch.zeros_like(a) for layer, a in clean.items()}
        for k in range(ig_steps):
            alpha = (k + 0.5) / ig_steps
            _, step, _, _ = _graded_pass(net, registry, x_t, t, eps, to_eps, {layer: alpha * d for layer, d in delta.items()})
            for layer in grads:
                grads[layer] += step[layer] / ig_steps
    scores = {layer: (delta[layer] * grads[layer]).flatten(2).sum(-1) for layer in clean}  # [B, h]
    if probes:
        pixels = eps[0].numel()
        for layer in scores:
            # (z·JΔa)² is an unbiased estimate of ‖JΔa‖²; the MSE is a mean over pixels
            sq = sum((delta[layer] * g[layer]).flatten(2).sum(-1).pow(2) for g in probe_grads) / probes
            scores[layer] = scores[layer] + sq / pixels
    return scores, loss


def _estimator_name(ig_steps: int, probes: int) -> str:
    return "ig" if ig_steps > 0 else "first_order+gn" if probes > 0 else "first_order"


def attribution_scores(
    denoiser,
    images: np.ndarray,
    *,
    timesteps: Sequence[int],
    method: str = "zero",
    ig_steps: int = 0,
    probes: int = 0,
    seed: int = 0,
    dataset: str = "a",
    batch_size: int = 50,
    registry: HeadRegistry | None = None,
) -> pd.DataFrame:
    """One row per timestep x image x head: the predicted ``degradation_pct`` of ablating that head.

    ``method``: "zero" or "mean" (the mean over ``images`` at the same position and timestep).
    ``ig_steps`` = 0 gives the first-order estimate, m > 0 integrated gradients with m steps.
    ``probes`` = K > 0 adds the Gauss-Newton term ‖J·Δa‖²/P, estimated from K random output probes.
    """
    if ig_steps < 0 or probes < 0:
        raise ValueError("ig_steps and probes must be >= 0")
    if ig_steps and probes:
        raise ValueError("integrated gradients already include the curvature along their path: use ig_steps or probes")
    if method not in ("zero", "mean"):
        raise ValueError("attribution supports zero and mean ablation")
    net, acp = denoiser.network, denoiser.alphas_cumprod
    x_all, device = torch.from_numpy(np.asarray(images, dtype=np.float32)), model_device(net)
    registry = registry or probe_registry(net, x_all[:1].to(device), torch.zeros(1, dtype=torch.long, device=device))
    batches = [np.arange(s, min(s + batch_size, len(x_all))) for s in range(0, len(x_all), batch_size)]
    rows = []
    for t_val in timesteps:
        def noisy(idx):
            eps = batch_noise(x_all.shape[1:], seed=seed, dataset=dataset, images=idx, timestep=t_val).to(device)
            t = torch.full((len(idx),), t_val, dtype=torch.long, device=device)
            return add_noise(x_all[idx].to(device), eps, t, acp), t, eps

        means = ActivationMoments()
        for idx in batches if method == "mean" else ():
            x_t, t, _ = noisy(idx)
            with torch.no_grad(), images_of(net, dataset, idx):
                means.add(clean_activations(net, registry, x_t, t, [])[1])
        ablated = (lambda layer, a: torch.zeros_like(a)) if method == "zero" else (lambda layer, a: means.mean(layer).to(a).expand_as(a))
        for idx in batches:
            x_t, t, eps = noisy(idx)
            with images_of(net, dataset, idx):
                scores, loss = _batch_scores(net, registry, x_t, t, eps, denoiser.eps_hat, ablated, ig_steps, probes,
                                             probe_seed=seed * 1_000_003 + t_val * 1009 + int(idx[0]))
            for info in registry.layers:
                s = scores[info.layer]
                rows.append(pd.DataFrame({
                    "dataset": dataset, "timestep": t_val, "image": np.repeat(idx, info.heads), "layer": info.layer,
                    "head": np.tile(np.arange(info.heads), len(idx)), "method": method,
                    "estimator": _estimator_name(ig_steps, probes),
                    "delta_mse": s.reshape(-1).double().cpu().numpy(),
                    "degradation_pct": (100 * s / loss[:, None]).reshape(-1).double().cpu().numpy(),
                }))
    return pd.concat(rows, ignore_index=True)
