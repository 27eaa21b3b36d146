"""Observe a denoiser on an image set: per-head attention statistics and denoising error.

For every image and timestep the image is noised with its own seeded noise draw (so results do
not depend on batch size or on which other images run beside it), denoised once with every
attention head instrumented, and two tidy tables come back:

- head rows: one per image x timestep x head, with ``entropy_nats`` and ``entropy_norm``
  (entropy / ln n_keys: 1.0 is uniform attention) and the metrics of ``metrics.attention``;
- image rows: one per image x timestep, with ε-MSE and x₀-MSE of the model and of the trivial
  predictor √(1−ᾱ)·x_t.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import torch

from diffcircuit.instrument.registry import HeadRegistry
from diffcircuit.instrument.session import instrument, probe_registry
from diffcircuit.metrics.attention import HEAD_METRICS, metrics_from_moments, uniform_moments
from diffcircuit.metrics.probes import ProbeFeatures
from diffcircuit.models.conditioning import image_key_counts, images_of
from diffcircuit.models.diffusion import (
    add_noise,
    eps_mse_per_image,
    implied_x0,
    trivial_eps,
    x0_mse_per_image,
)

__all__ = ["batch_noise", "image_noise", "observe"]


def image_noise(shape: Sequence[int], *, seed: int, dataset: str, image: int, timestep: int) -> torch.Tensor:
    """The noise draw for one image at one timestep: a function of its identity alone.

    ``dataset`` is any label (hashed whole, so "a/noise/x" and "a/noise/y" draw different noise).
    """
    label = int.from_bytes(hashlib.sha256(dataset.encode()).digest()[:8], "little")
    key = [seed, label, image, timestep]
    state = int(np.random.SeedSequence(key).generate_state(1, dtype=np.uint64)[0] % (2**63))
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(state))


def batch_noise(shape: Sequence[int], *, seed: int, dataset: str, images, timestep: int) -> torch.Tensor:
    """``image_noise`` for each image index in ``images``, stacked: ``[len(images), *shape]``."""
    return torch.stack([image_noise(shape, seed=seed, dataset=dataset, image=int(i), timestep=timestep) for i in images])


def _layer_metrics(captured: dict, info, features: ProbeFeatures, n_keys: torch.Tensor) -> dict[str, torch.Tensor]:
    """All head metrics of one layer, each ``[batch, heads]``; ``n_keys`` ``[batch, 1]``: keys each image attends over."""
    entropy = captured["entropy_nats"][info.layer]
    perplexity = captured["perplexity"][info.layer]
    moments = captured["moments"].get(info.layer)
    if moments is None:  # keys are not the query grid (e.g. cross-attention): no spatial probes
        nan = torch.full_like(entropy, math.nan)
        out = {name: nan for name in HEAD_METRICS}
        out |= {"effective_keys": perplexity, "effective_keys_frac": perplexity / n_keys}
    else:
        out = metrics_from_moments(moments, uniform_moments(features(info.query_grid)), perplexity,
                                   grid=info.query_grid, has_masks=features.has_masks)
        out["effective_keys_frac"] = perplexity / n_keys  # joint attention: its keys include the text's
    uniform = n_keys.double().log()  # ln(n_keys): the entropy of uniform attention (NaN for a single key)
    norm = torch.where(n_keys > 1, entropy.double() / uniform.clamp_min(1e-12), torch.full_like(uniform, math.nan))
    return {"entropy_nats": entropy, "entropy_norm": norm} | out


def _head_rows(captured: dict, registry: HeadRegistry, features: ProbeFeatures, images: np.ndarray, timestep: int,
               text_keys: torch.Tensor | None = None) -> pd.DataFrame:
    """Head rows of a batch; ``text_keys`` ``[batch]``: each image's unmasked prompt tokens (masked captions)."""
    frames = []
    for info in registry.layers:
        b = len(images)
        n_keys = torch.full((b, 1), float(info.n_keys or 1))
        if text_keys is not None and info.kind == "cross":  # each image attends over its own caption's tokens
            n_keys = text_keys.double().view(b, 1)
        metrics = _layer_metrics(captured, info, features, n_keys)
        h = metrics["entropy_nats"].shape[1]
        frame = {"image": np.repeat(images, h), "timestep": timestep, "layer": info.layer,
                 "head": np.tile(np.arange(h), b), "n_keys": np.repeat(n_keys.view(-1).numpy().astype(np.int64), h)}
        frame |= {name: values.double().numpy().reshape(-1) for name, values in metrics.items()}
        frames.append(pd.DataFrame(frame))
    return pd.concat(frames, ignore_index=True)


@torch.no_grad()
def observe(
    denoiser,
    images: np.ndarray,
    *,
    timesteps: Sequence[int],
    seed: int = 0,
    batch_size: int = 50,
    dataset: str = "a",
    masks: np.ndarray | None = None,
    method: str = "fused",
    registry: HeadRegistry | None = None,
    progress: Callable[[int], None] | None = None,
    first: int = 0,
    pictures: np.ndarray | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(head_rows, image_rows)`` for ``images`` (float ``[n, C, H, W]`` in [-1, 1]).

    ``masks`` (bool ``[n, H, W]``, synthetic images) enable the object probes; ``method`` picks
    the fused capture or the naive reference. ``first`` is the dataset index of ``images[0]``
    (a slice of a larger set): it names the rows and picks each image's noise draw. ``pictures``
    (latent models: the pixel images ``images`` encode) are what the probes look at; default ``images``.
    """
    net, acp = denoiser.network, denoiser.alphas_cumprod
    device = next(net.parameters()).device
    x_all = torch.from_numpy(np.asarray(images, dtype=np.float32))
    masks = None if masks is None else np.asarray(masks)  # once: a lazy set is made here, not per batch
    pictures = x_all if pictures is None else torch.from_numpy(np.asarray(pictures, dtype=np.float32))
    if registry is None or any(info.n_keys is None for info in registry.layers):
        registry = probe_registry(net, x_all[:1].to(device), torch.zeros(1, dtype=torch.long, device=device))
    head_frames, image_frames = [], []
    for start in range(0, len(x_all), batch_size):
        local = np.arange(start, min(start + batch_size, len(x_all)))
        idx = local + first
        x0 = x_all[local]
        features = ProbeFeatures(pictures[local].to(device), None if masks is None else torch.from_numpy(masks[local]))
        for t_val in timesteps:
            eps = batch_noise(x0.shape[1:], seed=seed, dataset=dataset, images=idx, timestep=t_val)
            t = torch.full((len(idx),), t_val, dtype=torch.long)
            x_t = add_noise(x0, eps, t, acp)
            with images_of(net, dataset, idx), instrument(net, registry=registry, capture=True, method=method,
                                                          key_features=features) as session:
                pred = denoiser.eps_hat(net(x_t.to(device), t.to(device)).sample.float().cpu(), x_t, t)
            captured = {stat: session.pop(stat) for stat in ("entropy_nats", "perplexity", "moments")}
            head_frames.append(_head_rows(captured, registry, features, idx, t_val, image_key_counts(net, dataset, idx)))
            base = trivial_eps(x_t, t, acp)
            image_frames.append(pd.DataFrame({
                "image": idx,
                "timestep": t_val,
                "eps_mse": eps_mse_per_image(pred, eps).double().numpy(),
                "x0_mse": x0_mse_per_image(implied_x0(x_t, pred, t, acp), x0).double().numpy(),
                "eps_mse_trivial": eps_mse_per_image(base, eps).double().numpy(),
                "x0_mse_trivial": x0_mse_per_image(implied_x0(x_t, base, t, acp), x0).double().numpy(),
            }))
            if progress is not None:
                progress(len(idx))
    heads = pd.concat(head_frames, ignore_index=True)
    per_image = pd.concat(image_frames, ignore_index=True)
    heads = heads.merge(per_image[["image", "timestep", "eps_mse", "x0_mse"]], on=["image", "timestep"])
    heads.insert(0, "dataset", dataset)
    per_image.insert(0, "dataset", dataset)
    return heads, per_image
