"""Attention maps for figures: where a few heads look from one query position, on a few images, and
DAAM-style cross-attention maps of each prompt token (Tang et al., 2023).

The map of head h for query position q is softmax(q_h · K_hᵀ / √d) over the keys: the row the
head's softmax produces, read from the layer's own ``to_q`` / ``to_k`` outputs (forward hooks on the
untouched modules; the default processor runs), so it is independent of the instrumented path.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from diffcircuit.instrument.registry import HeadAddress, HeadRegistry, attention_modules
from diffcircuit.metrics.observe import batch_noise
from diffcircuit.models.diffusion import add_noise, model_device

__all__ = ["attention_maps", "object_queries", "token_heatmaps", "token_maps"]


def object_queries(masks: np.ndarray | None, n: int, size: int) -> list[tuple[float, float]]:
    """A query per image as (y, x) fractions of the image: the object's centroid when a mask is given, else the centre."""
    if masks is None:
        return [(0.5, 0.5)] * n
    out = []
    for m in np.asarray(masks)[:n]:
        ys, xs = np.nonzero(m)
        out.append(((ys.mean() + 0.5) / size, (xs.mean() + 0.5) / size) if len(ys) else (0.5, 0.5))
    return out


def _projections(denoiser, images: np.ndarray, layers: Sequence[str], *, timestep: int, seed: int,
                 dataset: str) -> dict[tuple[str, str], torch.Tensor]:
    """``to_q`` / ``to_k`` outputs ``[B, N, heads*d]`` of ``layers`` on the noised ``images`` (one forward)."""
    net = denoiser.network
    modules = dict(attention_modules(net))
    device = model_device(net)
    x0 = torch.from_numpy(np.asarray(images, dtype=np.float32)).to(device)
    eps = batch_noise(x0.shape[1:], seed=seed, dataset=dataset, images=range(len(x0)), timestep=timestep).to(device)
    t = torch.full((len(x0),), timestep, dtype=torch.long, device=device)
    records: dict[tuple[str, str], torch.Tensor] = {}
    handles = []
    for layer in layers:
        for part in ("to_q", "to_k"):
            def hook(module, args, output, key=(layer, part)):
                records[key] = output.detach().float()
            handles.append(getattr(modules[layer], part).register_forward_hook(hook))
    try:
        net(add_noise(x0, eps, t, denoiser.alphas_cumprod), t)
    finally:
        for h in handles:
            h.remove()
    return records


def _head_probs(attn, q: torch.Tensor, k: torch.Tensor, head: int) -> torch.Tensor:
    """softmax(q_h · K_hᵀ / √d) of one head: ``[B, N_q, N_k]`` (float64)."""
    d = q.shape[-1] // attn.heads
    qh, kh = q[..., head * d:(head + 1) * d], k[..., head * d:(head + 1) * d]
    if attn.norm_q is not None:
        qh, kh = attn.norm_q(qh), attn.norm_k(kh)
    return torch.softmax((qh @ kh.transpose(-1, -2)).double() * d ** -0.5, -1)  # SDPA's default scale


@torch.no_grad()
def attention_maps(denoiser, images: np.ndarray, *, heads: Sequence[HeadAddress], timestep: int,
                   queries: Sequence[tuple[float, float]], seed: int = 0, dataset: str = "a") -> pd.DataFrame:
    """One row per image x head: the attention map (keys on the layer's grid, row-major) from ``queries[i]``.

    Self-attention layers on a square grid only. Images are noised as everywhere else (per-image seeded noise).
    """
    modules = dict(attention_modules(denoiser.network))
    records = _projections(denoiser, images, list(dict.fromkeys(a.layer for a in heads)), timestep=timestep, seed=seed,
                           dataset=dataset)
    rows = []
    for address in heads:
        q, k = records[(address.layer, "to_q")], records[(address.layer, "to_k")]  # [B, N, heads*d]
        side = int(round(q.shape[1] ** 0.5))
        if side * side != q.shape[1] or k.shape[1] != q.shape[1]:
            raise ValueError(f"{address.layer} is not self-attention on a square grid")
        for i, (fy, fx) in enumerate(queries):
            row, col = min(side - 1, int(fy * side)), min(side - 1, int(fx * side))
            at = row * side + col  # only this query's row of the softmax is needed, not all N x N
            probs = _head_probs(modules[address.layer], q[i:i + 1, at:at + 1], k[i:i + 1], address.head)
            rows.append({"dataset": dataset, "image": i, "timestep": timestep, "layer": address.layer,
                         "head": address.head, "grid": side, "query_y": row, "query_x": col,
                         "map": probs[0, 0].float().cpu().numpy()})
    return pd.DataFrame(rows)


@torch.no_grad()
def token_maps(denoiser, images: np.ndarray, *, registry: HeadRegistry, tokens: Sequence[str], timesteps: Sequence[int],
               seed: int = 0, dataset: str = "a") -> pd.DataFrame:
    """DAAM-style cross-attention maps: one row per image x timestep x cross-attention head x prompt token,
    with ``map`` the attention every query position gives that token (its column of the head's softmax over
    all keys, on the layer's query grid, row-major). ``tokens`` are the prompt's tokens (keys 0..len-1)."""
    modules = dict(attention_modules(denoiser.network))
    cross = [i for i in registry.layers if i.kind == "cross" and i.query_grid]
    rows = []
    for t in timesteps:
        records = _projections(denoiser, images, [i.layer for i in cross], timestep=t, seed=seed, dataset=dataset)
        for info in cross:
            q, k = records[(info.layer, "to_q")], records[(info.layer, "to_k")]
            for head in range(info.heads):
                probs = _head_probs(modules[info.layer], q, k, head)  # [B, N_q, N_k]
                for i in range(len(q)):
                    for j, text in enumerate(tokens):
                        rows.append({"dataset": dataset, "image": i, "timestep": int(t), "layer": info.layer,
                                     "head": head, "token": j, "text": text, "grid_h": info.query_grid[0],
                                     "grid_w": info.query_grid[1], "map": probs[i, :, j].float().cpu().numpy()})
    return pd.DataFrame(rows)


def token_heatmaps(maps: pd.DataFrame, size: int) -> pd.DataFrame:
    """DAAM's aggregate: per image and token, the mean over layers, heads and timesteps of the token's maps
    upsampled (bilinear) to ``size`` x ``size``. Rows: dataset, image, token, text, size, heatmap."""
    import torch.nn.functional as F

    rows = []
    for (dataset, image, token, text), g in maps.groupby(["dataset", "image", "token", "text"], sort=True):
        up = [F.interpolate(torch.from_numpy(np.asarray(r.map, dtype=np.float32)).view(1, 1, r.grid_h, r.grid_w),
                            size=(size, size), mode="bilinear", align_corners=False)[0, 0] for r in g.itertuples()]
        rows.append({"dataset": dataset, "image": int(image), "token": int(token), "text": text, "size": size,
                     "heatmap": torch.stack(up).mean(0).reshape(-1).numpy()})
    return pd.DataFrame(rows)
