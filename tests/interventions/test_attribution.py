"""Attribution patching against exact ablation effects on a toy whose output is linear in the heads."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.models.attention_processor import Attention
from scipy.stats import spearmanr

from diffcircuit import Denoiser, instrument, probe_registry
from diffcircuit.data.synthetic import synthetic_images
from diffcircuit.interventions.ablation import targets
from diffcircuit.interventions.attribution import attribution_scores
from diffcircuit.interventions.sweep import ablation_sweep
from diffcircuit.models.noise import image_noise


class LinearToy(torch.nn.Module):
    """One self-attention layer with a residual: the output is linear in the heads' outputs."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.attn = Attention(query_dim=3, heads=3, dim_head=4, residual_connection=True)

    def forward(self, sample, timestep):
        return SimpleNamespace(sample=self.attn(sample))


def _setup(net, n=4, size=8):
    den = Denoiser(network=net.eval(), scheduler=DDPMScheduler(), model_path=".", source="toy")
    images = synthetic_images(n, size=size, seed=2)[0]
    registry = probe_registry(net, torch.from_numpy(images[:1]), torch.zeros(1, dtype=torch.long))
    return den, images, registry


def _by_head(frame):
    frame = frame.assign(target=frame.layer + ":" + frame["head"].astype(str))
    return frame.set_index(["target", "image"]).sort_index()


def _mean_sq_prediction_change(den, images, method) -> pd.Series:
    """mean over pixels of (W_h (a'_h − a_h))², per head and image, from the toy's weights."""
    net = den.network
    x0 = torch.from_numpy(images)
    eps = torch.stack(
        [
            image_noise(x0.shape[1:], seed=0, dataset="a", image=i, timestep=300)
            for i in range(len(x0))
        ]
    )
    t = torch.full((len(x0),), 300)
    with torch.no_grad(), instrument(net, cache_heads=["attn"]) as session:
        net(den.scheduler.add_noise(x0, eps, t), t)
    a = session.pop("head_out")["attn"]  # [B, h, Q, d]
    target = torch.zeros_like(a) if method == "zero" else a.mean(0, keepdim=True).expand_as(a)
    w = net.attn.to_out[0].weight  # [C, h*d]
    d = a.shape[-1]
    out = {}
    for h in range(a.shape[1]):
        change = (target[:, h] - a[:, h]) @ w[:, h * d : (h + 1) * d].T  # [B, Q, C]
        for i in range(len(x0)):
            out[(f"attn:{h}", i)] = change[i].pow(2).mean().item()
    return pd.Series(out)


@pytest.mark.parametrize("method", ["zero", "mean"])
def test_first_order_plus_curvature_is_exact_on_a_linear_toy(method):
    """With pred linear in a head's output, L(a') − L(a) = first-order term + mean(Δpred²), exactly."""
    den, images, registry = _setup(LinearToy())
    exact = _by_head(
        ablation_sweep(
            den,
            images,
            targets=targets(registry, "head"),
            methods=[method],
            timesteps=[300],
            registry=registry,
        )
    )
    first = _by_head(
        attribution_scores(den, images, timesteps=[300], method=method, registry=registry)
    )
    remainder = (
        exact.mse_intervened - exact.mse_clean - first.delta_mse.reindex(exact.index)
    ).to_numpy()
    # the remainder is the mean squared change of the prediction, computed here from the weights
    np.testing.assert_allclose(
        remainder,
        _mean_sq_prediction_change(den, images, method).reindex(exact.index).to_numpy(),
        rtol=1e-3,
        atol=1e-10,
    )
    # and joint IG with one midpoint step is exact for the quadratic loss along the path, summed over heads: with
    # one layer, the path's end is the all-heads ablation it estimates
    ig = attribution_scores(
        den, images, timesteps=[300], method=method, ig_steps=1, registry=registry
    )
    assert set(ig.estimator) == {"ig_joint"}
    every = (
        ablation_sweep(
            den,
            images,
            targets=targets(registry, "all"),
            methods=[method],
            timesteps=[300],
            registry=registry,
        )
        .set_index("image")
        .sort_index()
    )
    total = ig.groupby("image").delta_mse.sum()
    np.testing.assert_allclose(
        total.to_numpy(), (every.mse_intervened - every.mse_clean).to_numpy(), rtol=1e-4, atol=1e-9
    )
    # per-head IG with one midpoint step is each head's own single-head ablation, exactly
    own = _by_head(
        attribution_scores(
            den,
            images,
            timesteps=[300],
            method=method,
            ig_steps=1,
            ig_path="per_head",
            registry=registry,
            head_chunk=2,
        )
    )
    assert set(own.estimator) == {"ig_per_head"}
    np.testing.assert_allclose(
        own.delta_mse.reindex(exact.index).to_numpy(),
        (exact.mse_intervened - exact.mse_clean).to_numpy(),
        rtol=1e-4,
        atol=1e-9,
    )


@pytest.mark.parametrize("method", ["zero", "mean"])
def test_gauss_newton_probes_estimate_the_curvature_term_without_bias(method):
    """On the linear toy the +gn score minus the first-order score estimates mean(Δpred²) (from the weights)."""
    den, images, registry = _setup(LinearToy())
    first = _by_head(
        attribution_scores(den, images, timesteps=[300], method=method, registry=registry)
    )
    gn = _by_head(
        attribution_scores(
            den, images, timesteps=[300], method=method, probes=1000, registry=registry
        )
    )
    assert set(gn.estimator) == {"first_order+gn"}
    exact = _mean_sq_prediction_change(den, images, method).reindex(gn.index).to_numpy()
    ratio = (gn.delta_mse - first.delta_mse).to_numpy() / exact
    # (z·v)² has relative sd √2, so 1,000 probes give ~4.5 % per estimate
    assert np.all(np.abs(ratio - 1) < 0.25), ratio
    assert abs(ratio.mean() - 1) < 0.05


def test_first_order_ranks_heads_like_exhaustive_ablation(small_unet):
    den, images, registry = _setup(small_unet, n=6, size=16)
    exact = ablation_sweep(
        den,
        images,
        targets=targets(registry, "head"),
        methods=["mean"],
        timesteps=[500],
        registry=registry,
    )
    est = attribution_scores(den, images, timesteps=[500], method="mean", registry=registry)
    e = exact.groupby("target").degradation_pct.mean()
    a = (
        est.assign(target=est.layer + ":" + est["head"].astype(str))
        .groupby("target")
        .degradation_pct.mean()
        .reindex(e.index)
    )
    assert spearmanr(a, e).statistic > 0.8


@pytest.mark.parametrize("method", ["zero", "mean"])
def test_per_head_integrated_gradients_converge_to_single_head_ablation(small_unet, method):
    """Along head h's own path the integral of its gradient is L(h ablated) − L(clean) (fundamental theorem);
    8 midpoint steps on the small UNet match the exhaustive sweep, heads stacked 5 per forward."""
    den, images, registry = _setup(small_unet, n=3, size=16)
    exact = _by_head(
        ablation_sweep(
            den,
            images,
            targets=targets(registry, "head"),
            methods=[method],
            timesteps=[300],
            registry=registry,
        )
    )
    ig = _by_head(
        attribution_scores(
            den,
            images,
            timesteps=[300],
            method=method,
            ig_steps=8,
            ig_path="per_head",
            registry=registry,
            head_chunk=5,
        )
    )
    truth = (exact.mse_intervened - exact.mse_clean).to_numpy()
    np.testing.assert_allclose(
        ig.delta_mse.reindex(exact.index).to_numpy(),
        truth,
        rtol=1e-2,
        atol=1e-4 * np.abs(truth).max(),
    )
    with pytest.raises(ValueError, match="ig_path"):
        attribution_scores(
            den,
            images,
            timesteps=[300],
            method=method,
            ig_steps=2,
            ig_path="diagonal",
            registry=registry,
        )
