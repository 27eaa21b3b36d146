"""Attribution patching: estimate every head's ablation effect from gradients.

For image i, head h with clean output slice a (before the output projection) and ablated value a'
(0 for zero ablation, the reference mean for mean ablation), the effect on the image's ε-MSE L_i is

- first order:   ΔL ≈ (a' − a) · ∂L/∂a |_clean                  (1 forward + 1 backward per batch)
- integrated gradients, ``ig_path="joint"`` (EAP-IG style, estimator ``ig_joint``):
  ΔL ≈ (a' − a) · mean_k ∂L/∂a |_{a + α_k (a' − a)}, with α_k = (k + ½)/m, every head shifted along the
  path *together* (m more forwards and backwards). Its scores split a joint intervention among the heads
  (they sum to L(end of path) − L(clean), up to the m-point quadrature), so they are compared with the
  all-heads ablation, not with single-head ablations. The path's end adds each head's clean Δa; where a
  later head's input depends on an earlier one, that end differs from ablating every head (exact for one
  layer), so even the total is an approximation of the joint ablation;
- integrated gradients, ``ig_path="per_head"`` (estimator ``ig_per_head``): for each head h alone, the
  path from clean to h ablated, ΔL_h ≈ (a'_h − a_h) · mean_k ∂L/∂a_h |_{a + α_k (a'_h − a_h) e_h}:
  an estimate of h's single-head ablation. Heads are stacked as copies of the batch (each copy shifts one
  head), ``head_chunk`` at a time; it costs m forwards and backwards per head — more than the
  exhaustive sweep it estimates, so it is a check of the estimator, not a shortcut.
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

from diffcircuit.errors import ConfigError
from diffcircuit.instrument.registry import HeadRegistry
from diffcircuit.instrument.session import instrument, probe_registry
from diffcircuit.interventions.sweep import ReferenceImages, reference_moments
from diffcircuit.models.diffusion import eps_mse_per_image
from diffcircuit.models.noise import batch_rows, noisy_batch

__all__ = ["ESTIMATES", "IG_PATHS", "attribution_scores"]

IG_PATHS = ("joint", "per_head")


def _graded_pass(
    den,
    registry,
    x_t,
    t,
    eps,
    rows,
    shifts: dict[str, torch.Tensor] | None = None,
    probes: int = 0,
    probe_seed: int = 0,
):
    """One forward and backward: each layer's head outputs (after ``shifts``), ∂(Σ_i L_i)/∂ them and
    the clean per-image loss; plus, per probe k, ∂(Σ_i z_ik · ε̂_i)/∂ them for seeded z_ik ~ N(0, I).

    The gradients are total derivatives: later heads keep responding to earlier ones.
    """
    layers = [i.layer for i in registry.layers]
    with (
        torch.enable_grad(),
        instrument(
            den, registry=registry, cache_heads=layers, shifts=shifts, keep_graph=True
        ) as session,
    ):
        eps_hat = den.predict_eps(x_t, t, rows=rows)
        cached = session.pop("head_out")
        outs = [cached[layer] for layer in layers]  # [B, h, Q, d] each, attached to the graph
        loss_per_image = eps_mse_per_image(eps_hat, eps)
        grads = torch.autograd.grad(loss_per_image.sum(), outs, retain_graph=probes > 0)
        gen = torch.Generator().manual_seed(probe_seed)
        probe_grads = []
        for k in range(probes):
            z = torch.randn(eps_hat.shape, generator=gen).to(eps_hat)
            probe_grads.append(
                dict(
                    zip(
                        layers,
                        torch.autograd.grad((z * eps_hat).sum(), outs, retain_graph=k < probes - 1),
                    )
                )
            )
    values = {layer: out.detach() for layer, out in zip(layers, outs)}
    return values, dict(zip(layers, grads)), loss_per_image.detach(), probe_grads


def _per_head_path_grads(
    den, registry, x_t, t, eps, rows, delta: dict[str, torch.Tensor], ig_steps: int, chunk: int
) -> dict[str, torch.Tensor]:
    """Per layer ``[B, h, Q, d]``: for each head, ∂L/∂a_h averaged over the points of *its own* path
    a + α_k Δa_h e_h. Heads are stacked as copies of the batch (copy j shifts head j only, each copy with the
    images' own conditioning rows), ``chunk`` at once."""
    heads = [(i.layer, h) for i in registry.layers for h in range(i.heads)]
    out = {layer: torch.zeros_like(d) for layer, d in delta.items()}
    b = x_t.shape[0]
    for start in range(0, len(heads), chunk):
        group = heads[start : start + chunk]
        c = len(group)
        x_rep, t_rep, eps_rep = (
            x_t.repeat(c, *[1] * (x_t.ndim - 1)),
            t.repeat(c),
            eps.repeat(c, *[1] * (eps.ndim - 1)),
        )
        for k in range(ig_steps):
            alpha = (k + 0.5) / ig_steps
            shifts = {
                layer: torch.zeros((c * b, *d.shape[1:]), dtype=d.dtype, device=d.device)
                for layer, d in delta.items()
            }
            for j, (layer, h) in enumerate(
                group
            ):  # copy j moves head h of its layer along its own path
                shifts[layer][j * b : (j + 1) * b, h] = alpha * delta[layer][:, h]
            rows_rep = None if rows is None else (rows[0], np.tile(rows[1], c))
            _, grads, _, _ = _graded_pass(den, registry, x_rep, t_rep, eps_rep, rows_rep, shifts)
            for j, (layer, h) in enumerate(group):
                out[layer][:, h] += grads[layer][j * b : (j + 1) * b, h] / ig_steps
    return out


def _batch_scores(
    den,
    registry,
    x_t,
    t,
    eps,
    rows,
    ablated: Callable[[str, torch.Tensor], torch.Tensor],
    ig_steps: int,
    probes: int = 0,
    probe_seed: int = 0,
    ig_path: str = "joint",
    head_chunk: int = 8,
):
    """Per layer ``[B, h]`` predicted ΔL, and the clean per-image loss ``[B]``; ``rows`` = (dataset, indices)."""
    clean, grads, loss, probe_grads = _graded_pass(
        den, registry, x_t, t, eps, rows, probes=probes, probe_seed=probe_seed
    )
    delta = {layer: ablated(layer, a) - a for layer, a in clean.items()}
    if ig_steps > 0 and ig_path == "per_head":
        grads = _per_head_path_grads(den, registry, x_t, t, eps, rows, delta, ig_steps, head_chunk)
    elif ig_steps > 0:
        grads = {layer: torch.zeros_like(a) for layer, a in clean.items()}
        for k in range(ig_steps):
            alpha = (k + 0.5) / ig_steps
            _, step, _, _ = _graded_pass(
                den, registry, x_t, t, eps, rows, {layer: alpha * d for layer, d in delta.items()}
            )
            for layer in grads:
                grads[layer] += step[layer] / ig_steps
    scores = {layer: (delta[layer] * grads[layer]).flatten(2).sum(-1) for layer in clean}  # [B, h]
    if probes:
        pixels = eps[0].numel()
        for layer in scores:
            # (z·JΔa)² is an unbiased estimate of ‖JΔa‖²; the MSE is a mean over pixels
            sq = (
                sum((delta[layer] * g[layer]).flatten(2).sum(-1).pow(2) for g in probe_grads)
                / probes
            )
            scores[layer] = scores[layer] + sq / pixels
    return scores, loss


ESTIMATES = {
    "first_order": "single-head ablation",
    "first_order+gn": "single-head ablation",
    "ig_per_head": "single-head ablation",
    "ig_joint": "all-heads ablation (its share of it, per head)",
}


def _estimator_name(ig_steps: int, probes: int, ig_path: str) -> str:
    if ig_steps > 0:
        return f"ig_{ig_path}"
    return "first_order+gn" if probes > 0 else "first_order"


def attribution_scores(
    denoiser,
    images: np.ndarray,
    *,
    timesteps: Sequence[int],
    method: str = "zero",
    ig_steps: int = 0,
    ig_path: str = "joint",
    probes: int = 0,
    seed: int = 0,
    dataset: str = "a",
    batch_size: int = 50,
    registry: HeadRegistry | None = None,
    head_chunk: int = 8,
    reference: Sequence[ReferenceImages] | None = None,
) -> pd.DataFrame:
    """One row per timestep x image x head: the predicted ``degradation_pct`` of ablating that head.

    ``method``: "zero" or "mean" (the mean over the ``reference`` images at the same position and timestep;
    None: over ``images`` themselves, in-sample).
    ``ig_steps`` = 0 gives the first-order estimate, m > 0 integrated gradients with m steps, along the
    all-heads path (``ig_path`` "joint") or along each head's own path ("per_head", ``head_chunk`` heads
    stacked per forward). ``probes`` = K > 0 adds the Gauss-Newton term ‖J·Δa‖²/P from K random probes.
    The ``estimator`` column names the estimate; ``ESTIMATES`` says which ablation each one estimates.
    """
    if ig_steps < 0 or probes < 0:
        raise ConfigError("ig_steps and probes must be >= 0")
    if ig_steps and probes:
        raise ConfigError(
            "integrated gradients already include the curvature along their path: use ig_steps or probes"
        )
    if method not in ("zero", "mean"):
        raise ConfigError("attribution supports zero and mean ablation")
    if ig_path not in IG_PATHS or head_chunk < 1:
        raise ConfigError(f"ig_path must be one of {IG_PATHS} and head_chunk >= 1")
    x_all = torch.from_numpy(np.asarray(images, dtype=np.float32))
    registry = registry or probe_registry(denoiser, x_all[:1])
    rows = []
    for t_val in timesteps:
        if method == "mean":
            refs = reference or [
                ReferenceImages(dataset=dataset, images=x_all.numpy(), index=np.arange(len(x_all)))
            ]
            means = reference_moments(
                denoiser, registry, refs, t_val, seed=seed, batch_size=batch_size
            )
        if method == "zero":
            ablated = lambda layer, a: torch.zeros_like(a)  # noqa: E731
        else:
            ablated = lambda layer, a, _means=means: _means.mean(layer).to(a).expand_as(a)  # noqa: E731
        for idx in batch_rows(len(x_all), batch_size):
            b = noisy_batch(denoiser, x_all[idx], idx, t_val, seed=seed, dataset=dataset)
            scores, loss = _batch_scores(
                denoiser,
                registry,
                b.x_t,
                b.t,
                b.eps,
                b.which,
                ablated,
                ig_steps,
                probes,
                probe_seed=seed * 1_000_003 + t_val * 1009 + int(idx[0]),
                ig_path=ig_path,
                head_chunk=head_chunk,
            )
            for info in registry.layers:
                s = scores[info.layer]
                rows.append(
                    pd.DataFrame(
                        {
                            "dataset": dataset,
                            "timestep": t_val,
                            "image": np.repeat(idx, info.heads),
                            "layer": info.layer,
                            "head": np.tile(np.arange(info.heads), len(idx)),
                            "method": method,
                            "estimator": _estimator_name(ig_steps, probes, ig_path),
                            "delta_mse": s.reshape(-1).cpu().double().numpy(),
                            "degradation_pct": (100 * s / loss[:, None])
                            .reshape(-1)
                            .cpu()
                            .double()
                            .numpy(),
                        }
                    )
                )
    return pd.concat(rows, ignore_index=True)
