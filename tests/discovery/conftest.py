"""Fixtures for discovery tests: the embedded model with six faces, and the circuit loss computed the plain way
(one head set per plain forward) as a reference for the stacked engine."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffcircuit import instrument, load_denoiser, load_images, probe_registry
from diffcircuit.models import noisy_batch
from diffcircuit.models.diffusion import eps_mse_per_image


class _PlainLoss:
    """L(S) the plain way: per timestep one forward over all images with S's heads patched to their in-sample means
    (taken from a plain cached forward), ε-MSE per image against each image's noise; memoised by set only."""

    def __init__(self, den, images, registry, timesteps, method="mean", dataset="a"):
        self.den, self.registry, self.method, self.metric = den, registry, method, "eps"
        self.heads, self.n_images = list(registry), len(images)
        x0 = torch.from_numpy(np.asarray(images, dtype=np.float32))
        self.batches = [
            noisy_batch(den, x0, np.arange(len(x0)), t, seed=0, dataset=dataset) for t in timesteps
        ]
        self.means = []
        for b in self.batches:
            with (
                torch.no_grad(),
                instrument(
                    den, registry=registry, cache_heads=[i.layer for i in registry.layers]
                ) as s,
            ):
                den.predict(b.x_t, b.t, rows=b.which)
            self.means.append(
                {layer: out.mean(0) for layer, out in s.pop("head_out").items()}
            )  # [heads, q, d]
        self.memo, self.forwards = {}, 0

    def per_image(self, ablated) -> np.ndarray:
        key = frozenset(ablated)
        if key not in self.memo:
            total = np.zeros(self.n_images)
            for b, means in zip(self.batches, self.means):
                patches = {
                    a: (means[a.layer][a.head] if self.method == "mean" else 0.0) for a in key
                }
                with torch.no_grad(), instrument(self.den, registry=self.registry, patches=patches):
                    eps_hat = self.den.predict_eps(b.x_t, b.t, rows=b.which)
                total += eps_mse_per_image(eps_hat, b.eps).double().numpy()
                self.forwards += 1
            self.memo[key] = total / len(self.batches)
        return self.memo[key]

    def __call__(self, ablated) -> float:
        return float(self.per_image(ablated).mean())


@pytest.fixture(scope="module")
def embedded():
    den = load_denoiser()
    images = load_images("faces", n=6, size=32, channels=3).images
    registry = probe_registry(den, torch.from_numpy(images[:1]), torch.zeros(1, dtype=torch.long))
    return den, images, registry


@pytest.fixture(scope="session")
def plain_loss():
    """``plain_loss(den, images, registry, timesteps, method="mean", dataset="a")``: L(S) the plain way."""
    return _PlainLoss
