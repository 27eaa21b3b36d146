"""Attention maps for a gallery: where a few heads look from one query position, on a few images.

The map of head h for query position q is softmax(q_h · K_hᵀ / √d) over the keys: the row the
head's softmax produces, read from the layer's own ``to_q`` / ``to_k`` outputs (forward hooks on the
untouched modules; the default processor runs), so it is independent of the instrumented path.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from diffcircuit.instrument.registry import HeadAddress, attention_modules
from diffcircuit.metrics.observe import batch_noise
from diffcircuit.models.diffusion import add_noise, model_device

__all__ = ["attention_maps", "object_queries"]


def object_queries(masks: np.ndarray | None, n: int, size: int) -> list[tuple[float, float]]:
    """A query per image as (y, x) fractions of the image: the object's centroid when a mask is given, else the centre."""
    if masks is None:
        return [(0.5, 0.5)] * n
    out = []
    for m in np.asarray(masks)[:n]:
        ys, xs = np.nonzero(m)
        out.append(((ys.mean() + 0.5) / size, (xs.mean() + 0.5) / size) if len(ys) else (0.5, 0.5))
    return out


@torch.no_grad()
def attention_maps(denoiser, images: np.ndarray, *, heads: Sequence[HeadAddress], timestep: int,
                   queries: Sequence[tuple[float, float]], seed: int = 0, dataset: str = "a") -> pd.DataFrame:
    """One row per image x head: the attention map (keys on the layer's grid, row-major) from ``queries[i]``.

    Self-attention layers on a square grid only. Images are noised as everywhere else (per-image seeded noise).
    """
    net = denoiser.network
    modules = dict(attention_modules(net))
    layers = list(dict.fromkeys(a.layer for a in heads))
    device = model_device(net)
    x0 = torch.from_numpy(np.asarray(images, dtype=np.float32)).to(device)
    eps = batch_noise(x0.shape[1:], seed=seed, dataset=dataset, images=range(len(x0)), timestep=timestep).to(device)
    t = torch.full((len(x0),), timestep, dtype=torch.long, device=device)
    records: dict[tuple[str, str], torch.Tensor] = {}
    handles = []
    for layer in layers:
        for part in ("to_q", "to_k"):
            def hook(module, args, output, key=(layer, part)):
                records[key] = output.detach()
            handles.append(getattr(modules[layer], part).register_forward_hook(hook))
    try:
        net(add_noise(x0, eps, t, denoiser.alphas_cumprod), t)
    finally:
        for h in handles:
            h.remove()
    rows = []
    for address in heads:
        attn = modules[address.layer]
        q, k = records[(address.layer, "to_q")], records[(address.layer, "to_k")]  # [B, N, heads*d]
        d = q.shape[-1] // attn.heads
        side = int(round(q.shape[1] ** 0.5))
        if side * side != q.shape[1] or k.shape[1] != q.shape[1]:
            raise ValueError(f"{address.layer} is not self-attention on a square grid")
        qh = q[..., address.head * d:(address.head + 1) * d]
        kh = k[..., address.head * d:(address.head + 1) * d]
        if attn.norm_q is not None:
            qh, kh = attn.norm_q(qh), attn.norm_k(kh)
        for i, (fy, fx) in enumerate(queries):
            row, col = min(side - 1, int(fy * side)), min(side - 1, int(fx * side))
            logits = kh[i] @ qh[i, row * side + col] * d ** -0.5  # SDPA's default scale, as the default processor uses
            rows.append({"dataset": dataset, "image": i, "timestep": timestep, "layer": address.layer,
                         "head": address.head, "grid": side, "query_y": row, "query_x": col,
                         "map": torch.softmax(logits.double(), 0).float().cpu().numpy()})
    return pd.DataFrame(rows)
