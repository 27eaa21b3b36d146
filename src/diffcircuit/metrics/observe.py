"""Observe a denoiser on an image set: per-head attention statistics and denoising error.

For every image and timestep the image is noised with its own seeded noise draw (so results do
not depend on batch size or on which other images run beside it), denoised once with every
attention head instrumented, and two tidy tables come back:

- head rows: one per image x timestep x head, with ``entropy_nats`` and ``entropy_norm``
  (entropy / ln n_keys: 1.0 is uniform attention) and the metrics of ``metrics.attention``;
- image rows: one per image x timestep, with ε-MSE and x₀-MSE of the model and of the trivial
  predictor √(1−ᾱ)·x_t.

``observe_with_null`` also runs the role null (``metrics.roles``): within each block of images, every
head's attention on image i is scored against the content features of every image j of the block
(``instrument.capture.partner_moments``): S[i, j], the log content score of ``metrics.attention``. Head
rows gain, per content probe, ``<probe>_log`` (S[i, i]) and ``<probe>_excess`` (S[i, i] − mean_{j≠i} S[i, j]),
and the blocks' score matrices come back for the matched-pairing permutation test (``stats.matching``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from diffcircuit.data.spec import ImageSet, LazyImages
from diffcircuit.instrument.registry import HeadRegistry
from diffcircuit.instrument.session import instrument, probe_registry
from diffcircuit.metrics.attention import (
    CONTENT_PROBES,
    HEAD_METRICS,
    PARTNER_CHANNELS,
    content_log_scores,
    metrics_from_moments,
    uniform_moments,
)
from diffcircuit.metrics.probes import PROBE_CHANNELS, ProbeFeatures
from diffcircuit.models.diffusion import (
    eps_mse_per_image,
    implied_x0,
    trivial_eps,
    x0_mse_per_image,
)
from diffcircuit.models.noise import batch_rows, noisy_batch

__all__ = ["BlockScores", "NullObservation", "Observation", "observe", "observe_with_null"]


def _layer_metrics(
    captured: dict, info, features: ProbeFeatures, n_keys: torch.Tensor
) -> dict[str, torch.Tensor]:
    """All head metrics of one layer, each ``[batch, heads]``; ``n_keys`` ``[batch, 1]``: keys each image attends over."""
    entropy = captured["entropy_nats"][info.layer]
    perplexity = captured["perplexity"][info.layer]
    moments = captured["moments"].get(info.layer)
    if moments is None:  # keys are not the query grid (e.g. cross-attention): no spatial probes
        nan = torch.full_like(entropy, math.nan)
        out = {name: nan for name in HEAD_METRICS}
        out |= {"effective_keys": perplexity, "effective_keys_frac": perplexity / n_keys}
    else:
        out = metrics_from_moments(
            moments,
            uniform_moments(features(info.query_grid)),
            perplexity,
            grid=info.query_grid,
            has_masks=features.has_masks,
        )
        out["effective_keys_frac"] = (
            perplexity / n_keys
        )  # joint attention: its keys include the text's
    uniform = (
        n_keys.double().log()
    )  # ln(n_keys): the entropy of uniform attention (NaN for a single key)
    norm = torch.where(
        n_keys > 1, entropy.double() / uniform.clamp_min(1e-12), torch.full_like(uniform, math.nan)
    )
    return {"entropy_nats": entropy, "entropy_norm": norm} | out


def _head_rows(
    captured: dict,
    registry: HeadRegistry,
    features: ProbeFeatures,
    images: np.ndarray,
    timestep: int,
    text_keys: torch.Tensor | None = None,
) -> pd.DataFrame:
    """Head rows of a batch; ``text_keys`` ``[batch]``: each image's unmasked prompt tokens (masked captions)."""
    frames = []
    for info in registry.layers:
        b = len(images)
        n_keys = torch.full((b, 1), float(info.n_keys or 1))
        if (
            text_keys is not None and info.kind == "cross"
        ):  # each image attends over its own caption's tokens
            n_keys = text_keys.double().view(b, 1)
        metrics = _layer_metrics(captured, info, features, n_keys)
        h = metrics["entropy_nats"].shape[1]
        frame = {
            "image": np.repeat(images, h),
            "timestep": timestep,
            "layer": info.layer,
            "head": np.tile(np.arange(h), b),
            "n_keys": np.repeat(n_keys.view(-1).numpy().astype(np.int64), h),
        }
        frame |= {name: values.double().numpy().reshape(-1) for name, values in metrics.items()}
        frames.append(pd.DataFrame(frame))
    return pd.concat(frames, ignore_index=True)


class _Inputs:
    """What every batch of an observation needs: the network, its registry and the images on the right device."""

    def __init__(self, denoiser, images, masks, pictures, registry):
        self.den, self.net = denoiser, denoiser.network
        self.device = next(self.net.parameters()).device
        self.x = torch.from_numpy(np.asarray(images, dtype=np.float32))
        self.masks = (
            None if masks is None else np.asarray(masks)
        )  # once: a lazy set is made here, not per batch
        self.pictures = (
            self.x if pictures is None else torch.from_numpy(np.asarray(pictures, dtype=np.float32))
        )
        if registry is None or any(info.n_keys is None for info in registry.layers):
            registry = probe_registry(denoiser, self.x[:1])
        self.registry = registry

    def features(self, local: np.ndarray) -> ProbeFeatures:
        return ProbeFeatures(
            self.pictures[local].to(self.device),
            None if self.masks is None else torch.from_numpy(self.masks[local]),
        )


def _batch(
    inp: _Inputs,
    local: np.ndarray,
    idx: np.ndarray,
    t_val: int,
    features: ProbeFeatures,
    *,
    seed: int,
    dataset: str,
    method: str,
    partners: ProbeFeatures | None = None,
):
    """One batch at one timestep: ``(head rows, image rows, partner moments {layer: [B, h, n, C+1, C+1]})``."""
    acp = inp.den.alphas_cumprod
    batch = noisy_batch(inp.den, inp.x[local], idx, t_val, seed=seed, dataset=dataset)
    x0, eps, t, x_t = batch.x0.cpu(), batch.eps.cpu(), batch.t.cpu(), batch.x_t.cpu()
    partner_maps = None if partners is None else (lambda grid: partners(grid)[:, _PARTNER_INDEX])
    with instrument(
        inp.den,
        registry=inp.registry,
        capture=True,
        method=method,
        key_features=features,
        partner_features=partner_maps,
        partner_paired=_paired(partners),
    ) as session:
        pred = inp.den.predict_eps(batch.x_t, batch.t, rows=batch.which).cpu()
    captured = {stat: session.pop(stat) for stat in ("entropy_nats", "perplexity", "moments")}
    heads = _head_rows(
        captured, inp.registry, features, idx, t_val, inp.den.caption_key_counts(dataset, idx)
    )
    base = trivial_eps(x_t, t, acp)
    images = pd.DataFrame(
        {
            "image": idx,
            "timestep": t_val,
            "eps_mse": eps_mse_per_image(pred, eps).double().numpy(),
            "x0_mse": x0_mse_per_image(implied_x0(x_t, pred, t, acp), x0).double().numpy(),
            "eps_mse_trivial": eps_mse_per_image(base, eps).double().numpy(),
            "x0_mse_trivial": x0_mse_per_image(implied_x0(x_t, base, t, acp), x0).double().numpy(),
        }
    )
    return heads, images, session.pop("partner_moments")


def _finish(
    head_frames: list, image_frames: list, dataset: str
) -> tuple[pd.DataFrame, pd.DataFrame]:
    heads = pd.concat(head_frames, ignore_index=True)
    per_image = pd.concat(image_frames, ignore_index=True)
    heads = heads.merge(
        per_image[["image", "timestep", "eps_mse", "x0_mse"]], on=["image", "timestep"]
    )
    heads.insert(0, "dataset", dataset)
    per_image.insert(0, "dataset", dataset)
    return heads, per_image


@dataclass(frozen=True, kw_only=True, eq=False)
class Observation:
    """What ``observe`` measured: one row per image x timestep x head (``heads``) and one per image x timestep
    (``images``: denoising errors next to the trivial predictor's). Unpacks as ``heads, images = observe(...)``."""

    heads: pd.DataFrame
    images: pd.DataFrame

    def __iter__(self):
        return iter((self.heads, self.images))


@torch.no_grad()
def observe(
    denoiser,
    images: np.ndarray | LazyImages | ImageSet,
    *,
    timesteps: Sequence[int],
    seed: int = 0,
    batch_size: int = 50,
    dataset: str = "a",
    masks: np.ndarray | LazyImages | None = None,
    method: str = "fused",
    registry: HeadRegistry | None = None,
    progress: Callable[[int], None] | None = None,
    first: int = 0,
    pictures: np.ndarray | LazyImages | None = None,
) -> Observation:
    """Head and image rows (``Observation``) for ``images``: an ``ImageSet`` (its masks and, for a latent model,
    its pixels come with it) or float ``[n, C, H, W]`` in [-1, 1].

    ``masks`` (bool ``[n, H, W]``, synthetic images) enable the object probes; ``method`` picks
    the fused capture or the naive reference. ``first`` is the dataset index of ``images[0]``
    (a slice of a larger set): it names the rows and picks each image's noise draw. ``pictures``
    (latent models: the pixel images ``images`` encode) are what the probes look at; default ``images``.
    """
    if isinstance(images, ImageSet):
        masks = images.masks if masks is None else masks
        pictures = images.pixels if pictures is None else pictures
        images = images.images
    inp = _Inputs(denoiser, images, masks, pictures, registry)
    head_frames, image_frames = [], []
    for local in batch_rows(len(inp.x), batch_size):
        features = inp.features(local)
        for t_val in timesteps:
            heads, rows, _ = _batch(
                inp,
                local,
                local + first,
                t_val,
                features,
                seed=seed,
                dataset=dataset,
                method=method,
            )
            head_frames.append(heads)
            image_frames.append(rows)
            if progress is not None:
                progress(len(local))
    heads, per_image = _finish(head_frames, image_frames, dataset)
    return Observation(heads=heads, images=per_image)


_PARTNER_INDEX = [PROBE_CHANNELS.index(c) for c in PARTNER_CHANNELS]


# the content scores' only query-weighted moments: M[intensity, intensity] and M[object, object]
def _paired(partners: ProbeFeatures | None) -> tuple[int, ...]:
    """The content scores' only query-weighted moments: M[intensity, intensity], and M[object, object] with masks."""
    if partners is None:
        return ()
    return (PARTNER_CHANNELS.index("intensity"),) + (
        (PARTNER_CHANNELS.index("object"),) if partners.has_masks else ()
    )


@dataclass(frozen=True, kw_only=True, eq=False)
class BlockScores:
    """One block's score matrix for one layer and content probe at one timestep: ``scores`` [heads, n, n]
    (S[i, j], images i, j of the block that have a valid score; ``images`` their dataset indices)."""

    timestep: int
    block_start: int  # dataset index of the block's first image: keys its permutations
    layer: str
    probe: str
    images: np.ndarray
    scores: np.ndarray


@dataclass(frozen=True, kw_only=True, eq=False)
class NullObservation:
    """``observe`` plus the role null's score matrices, block by block."""

    heads: pd.DataFrame
    images: pd.DataFrame
    blocks: list[BlockScores]


def _block_scores(parts: list[dict], registry: HeadRegistry, partners: ProbeFeatures) -> dict:
    """{(layer, probe): S [heads, n, n]} from each batch's partner moments, in image order."""
    out = {}
    for info in registry.layers:
        if info.layer not in parts[0]:
            continue  # no spatial keys (cross-attention): no content probes
        grid = info.query_grid
        assert (
            grid is not None
        )  # content moments are recorded only where keys lie on the query grid
        moments = torch.cat([p[info.layer] for p in parts])  # [n, h, n, C+1, C+1]
        uniform = uniform_moments(partners(grid)[:, _PARTNER_INDEX])  # [n, C+1, C+1]
        scores = content_log_scores(
            moments, uniform[None, None], has_masks=partners.has_masks, channels=PARTNER_CHANNELS
        )
        for probe, s in scores.items():
            out[(info.layer, probe)] = s.permute(1, 0, 2).numpy()  # [h, i, j]
    return out


def _null_of_block(
    scores: dict, block: np.ndarray, t_val: int
) -> tuple[list[pd.DataFrame], list[BlockScores]]:
    """Per-image rows (``log`` = S[i, i], ``excess`` = S[i, i] − mean_{j≠i} S[i, j]) and the valid score matrices."""
    rows, kept = [], []
    for (layer, probe), s in scores.items():
        valid = np.isfinite(s).all(
            axis=(0, 1)
        )  # image j's baseline exists (e.g. not a flat image for edges)
        own = np.full(s.shape[:2], np.nan)
        excess = np.full(s.shape[:2], np.nan)
        if valid.sum() >= 2:
            sub = s[:, valid][:, :, valid].astype(np.float64)
            diag = np.diagonal(sub, axis1=1, axis2=2)
            own[:, valid] = diag
            excess[:, valid] = diag - (sub.sum(-1) - diag) / (valid.sum() - 1)
            kept.append(
                BlockScores(
                    timestep=t_val,
                    block_start=int(block[0]),
                    layer=layer,
                    probe=probe,
                    images=block[valid],
                    scores=sub,
                )
            )
        h = s.shape[0]
        rows.append(
            pd.DataFrame(
                {
                    "image": np.repeat(block, h),
                    "timestep": t_val,
                    "layer": layer,
                    "head": np.tile(np.arange(h), len(block)),
                    "probe": probe,
                    "log": own.T.reshape(-1),
                    "excess": excess.T.reshape(-1),
                }
            )
        )
    return rows, kept


@torch.no_grad()
def observe_with_null(
    denoiser,
    images: np.ndarray,
    *,
    timesteps: Sequence[int],
    blocks: Sequence[tuple[int, int]] | None = None,
    seed: int = 0,
    batch_size: int = 50,
    dataset: str = "a",
    masks: np.ndarray | None = None,
    method: str = "fused",
    registry: HeadRegistry | None = None,
    progress: Callable[[int], None] | None = None,
    first: int = 0,
    pictures: np.ndarray | None = None,
) -> NullObservation:
    """``observe``, with the role null's scores computed within each block (local ``(lo, hi)`` ranges covering
    the images; default: one block of all): every head's attention on each image against the content features
    of every image of its block."""
    inp = _Inputs(denoiser, images, masks, pictures, registry)
    blocks = [(0, len(inp.x))] if blocks is None else list(blocks)
    head_frames, image_frames, null_frames, kept = [], [], [], []
    for t_val in timesteps:
        for lo, hi in blocks:
            block = np.arange(lo, hi)
            partners = inp.features(block)
            parts = []
            for local in batch_rows(hi - lo, batch_size, first=lo):
                heads, rows, moments = _batch(
                    inp,
                    local,
                    local + first,
                    t_val,
                    inp.features(local),
                    seed=seed,
                    dataset=dataset,
                    method=method,
                    partners=partners,
                )
                head_frames.append(heads)
                image_frames.append(rows)
                parts.append(moments)
                if progress is not None:
                    progress(len(local))
            rows, scores = _null_of_block(
                _block_scores(parts, inp.registry, partners), block + first, t_val
            )
            null_frames += rows
            kept += scores
    heads, per_image = _finish(head_frames, image_frames, dataset)
    if null_frames:
        wide = pd.concat(null_frames, ignore_index=True).pivot_table(
            index=["image", "timestep", "layer", "head"],
            columns="probe",
            values=["log", "excess"],
            dropna=False,
        )
        wide.columns = [f"{probe}_{kind}" for kind, probe in wide.columns]
        heads = heads.merge(
            wide.reset_index(), on=["image", "timestep", "layer", "head"], how="left"
        )
    for probe in CONTENT_PROBES:  # every column exists (NaN where no probe could be scored)
        for kind in ("log", "excess"):
            if f"{probe}_{kind}" not in heads:
                heads[f"{probe}_{kind}"] = np.nan
    return NullObservation(heads=heads, images=per_image, blocks=kept)
