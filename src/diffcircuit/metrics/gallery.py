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

from diffcircuit.instrument.registry import HeadAddress, HeadRegistry, attention_modules, layer_kind
from diffcircuit.metrics.observe import batch_noise
from diffcircuit.models.conditioning import images_of
from diffcircuit.models.diffusion import add_noise, model_device

__all__ = ["attention_maps", "mappable_layers", "object_queries", "token_heatmaps", "token_maps"]


def mappable_layers(network: torch.nn.Module) -> set[str]:
    """Layers whose maps these functions compute from ``to_q`` / ``to_k`` alone: not Flux's, whose rotary position
    embeddings act between the projections and the softmax."""
    return {name for name, module in attention_modules(network) if type(module).__name__ != "FluxAttention"}


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
    """``to_q`` / ``to_k`` outputs ``[B, N, heads*d]`` of ``layers`` on the noised ``images`` (one forward), and
    ``add_k_proj`` (the text keys) of joint-attention layers."""
    net = denoiser.network
    modules = dict(attention_modules(net))
    device = model_device(net)
    x0 = torch.from_numpy(np.asarray(images, dtype=np.float32)).to(device)
    eps = batch_noise(x0.shape[1:], seed=seed, dataset=dataset, images=range(len(x0)), timestep=timestep).to(device)
    t = torch.full((len(x0),), timestep, dtype=torch.long, device=device)
    records: dict[tuple[str, str], torch.Tensor] = {}
    handles = []
    for layer in layers:
        parts = ("to_q", "to_k") + (("add_k_proj",) if layer_kind(modules[layer]) == "joint" else ())
        for part in parts:
            def hook(module, args, output, key=(layer, part)):
                records[key] = output.detach().float()
            handles.append(getattr(modules[layer], part).register_forward_hook(hook))
    try:
        with images_of(net, dataset, np.arange(len(x0))):
            net(add_noise(x0, eps, t, denoiser.alphas_cumprod), t)
    finally:
        for h in handles:
            h.remove()
    return records


def _head_probs(attn, records: dict, layer: str, head: int, rows=slice(None)) -> torch.Tensor:
    """softmax(q_h · K_hᵀ / √d) of one head for the queries ``rows``: ``[B, N_q, N_k]`` (float64). Keys of a
    joint-attention layer are [image | text], each normalised by its own norm, as the processor does."""
    d = records[(layer, "to_q")].shape[-1] // attn.heads

    def part(name):
        return records[(layer, name)][..., head * d:(head + 1) * d]

    qh, kh = part("to_q")[:, rows], part("to_k")
    if attn.norm_q is not None:
        qh, kh = attn.norm_q(qh), attn.norm_k(kh)
    if (layer, "add_k_proj") in records:
        text = part("add_k_proj")
        kh = torch.cat([kh, attn.norm_added_k(text) if attn.norm_added_k is not None else text], 1)
    return torch.softmax((qh @ kh.transpose(-1, -2)).double() * d ** -0.5, -1)  # SDPA's default scale


@torch.no_grad()
def attention_maps(denoiser, images: np.ndarray, *, heads: Sequence[HeadAddress], timestep: int,
                   queries: Sequence[tuple[float, float]], seed: int = 0, dataset: str = "a") -> pd.DataFrame:
    """One row per image x head: the attention map (keys on the layer's grid, row-major) from ``queries[i]``.

    Self- and joint-attention layers on a square grid only; a joint head's map is the attention its image query
    gives the image keys (the rest of the row goes to the text). Images are noised as everywhere else.
    """
    modules = dict(attention_modules(denoiser.network))
    records = _projections(denoiser, images, list(dict.fromkeys(a.layer for a in heads)), timestep=timestep, seed=seed,
                           dataset=dataset)
    rows = []
    for address in heads:
        attn = modules[address.layer]
        n = records[(address.layer, "to_q")].shape[1]  # query positions [B, N, heads*d]
        side = int(round(n ** 0.5))
        if side * side != n or layer_kind(attn) == "cross" or address.layer not in mappable_layers(denoiser.network):
            raise ValueError(f"{address.layer} is not self- or joint attention on a square grid without rotary embeddings")
        for i, (fy, fx) in enumerate(queries):
            row, col = min(side - 1, int(fy * side)), min(side - 1, int(fx * side))
            at = row * side + col  # only this query's row of the softmax is needed, not all N x N
            probs = _head_probs(attn, records, address.layer, address.head, rows=slice(at, at + 1))[i, 0, :n]
            rows.append({"dataset": dataset, "image": i, "timestep": timestep, "layer": address.layer,
                         "head": address.head, "grid": side, "query_y": row, "query_x": col,
                         "map": probs.float().cpu().numpy()})
    return pd.DataFrame(rows)


@torch.no_grad()
def token_maps(denoiser, images: np.ndarray, *, registry: HeadRegistry, tokens: Sequence[str] | Sequence[Sequence[str]],
               timesteps: Sequence[int], seed: int = 0, dataset: str = "a") -> pd.DataFrame:
    """DAAM-style cross-attention maps: one row per image x timestep x cross- (or joint-) attention head x prompt token,
    with ``map`` the attention every query position gives that token (its column of the head's softmax over
    all keys, on the layer's query grid, row-major). ``tokens`` are the prompt's tokens (keys 0..len-1), or each
    image's own (captioned images)."""
    per_image = len(tokens) > 0 and not isinstance(tokens[0], str)
    modules = dict(attention_modules(denoiser.network))
    mappable = mappable_layers(denoiser.network)
    cross = [i for i in registry.layers if i.kind in ("cross", "joint") and i.query_grid and i.layer in mappable]
    rows = []
    for t in timesteps:
        records = _projections(denoiser, images, [i.layer for i in cross], timestep=t, seed=seed, dataset=dataset)
        for info in cross:
            n_image = info.query_grid[0] * info.query_grid[1]
            first = n_image if info.kind == "joint" else 0  # joint keys are [image | text]
            for head in range(info.heads):
                probs = _head_probs(modules[info.layer], records, info.layer, head)  # [B, N_q, N_k]
                for i in range(len(probs)):
                    for j, text in enumerate(tokens[i] if per_image else tokens):
                        rows.append({"dataset": dataset, "image": i, "timestep": int(t), "layer": info.layer,
                                     "head": head, "token": j, "text": text, "grid_h": info.query_grid[0],
                                     "grid_w": info.query_grid[1], "map": probs[i, :, first + j].float().cpu().numpy()})
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
