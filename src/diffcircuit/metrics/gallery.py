"""Attention maps for figures: where a few heads look from one query position, on a few images, and
DAAM-style cross-attention maps of each prompt token (Tang et al., 2023).

The map of head h for query position q is softmax(q_h · K_hᵀ / √d) over the keys: the row the
head's softmax produces, read from the layer's own ``to_q`` / ``to_k`` outputs (forward hooks on the
untouched modules; the default processor runs), so it is independent of the instrumented path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from diffcircuit.errors import ConfigError
from diffcircuit.instrument.registry import HeadAddress, HeadRegistry, attention_modules, layer_kind
from diffcircuit.instrument.session import probe_registry
from diffcircuit.models.noise import noisy_batch

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


@dataclass(frozen=True)
class _LayerQK:
    """One layer's queries of the image ``[B, N_img, heads, d]`` and all its keys ``[B, N_k, heads, d]``, as its
    softmax sees them (normalised, rotated); where the image's and the text's keys lie among the keys."""

    queries: torch.Tensor
    keys: torch.Tensor
    image_keys: slice | None  # None: cross-attention (keys are text only)
    text_keys: slice | None  # None: self-attention


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.unflatten(-1, (heads, -1))  # [B, N, heads*d] -> [B, N, heads, d]


def _norm(norm, x):
    return norm(x) if norm is not None else x


def _standard_qk(attn, got: dict) -> _LayerQK:
    """From the ``to_q`` / ``to_k`` (and ``add_k_proj``) outputs of a self, cross or SD3 joint layer."""
    q = _norm(attn.norm_q, _split_heads(got["to_q"], attn.heads))
    k = _norm(attn.norm_k, _split_heads(got["to_k"], attn.heads))
    n = q.shape[1]
    if "add_k_proj" in got:  # SD3: [image | text]
        text = _norm(attn.norm_added_k, _split_heads(got["add_k_proj"], attn.heads))
        return _LayerQK(q, torch.cat([k, text], 1), slice(0, n), slice(n, n + text.shape[1]))
    if layer_kind(attn) == "cross":
        return _LayerQK(q, k, None, slice(0, k.shape[1]))
    return _LayerQK(q, k, slice(0, n), None)


def _flux_qk(attn, inputs: dict, n_text: int) -> _LayerQK:
    """From a Flux attention's inputs: the [text | image] sequence, projected, normalised and rotated as the
    processor does (rotary embeddings act after the projections, so the outputs of to_q / to_k are not enough)."""
    from diffusers.models.embeddings import apply_rotary_emb

    def proj(x, linear, norm):
        return _norm(norm, linear(x).unflatten(-1, (-1, attn.head_dim)))  # [B, S, heads, d]

    hidden, text = inputs["hidden_states"], inputs.get("encoder_hidden_states")
    q, k = proj(hidden, attn.to_q, attn.norm_q), proj(hidden, attn.to_k, attn.norm_k)
    if text is not None and attn.added_kv_proj_dim is not None:
        n_text = text.shape[1]
        q = torch.cat([proj(text, attn.add_q_proj, attn.norm_added_q), q], 1)
        k = torch.cat([proj(text, attn.add_k_proj, attn.norm_added_k), k], 1)
    rope = inputs.get("image_rotary_emb")
    if rope is not None:
        q, k = apply_rotary_emb(q, rope, sequence_dim=1), apply_rotary_emb(k, rope, sequence_dim=1)
    return _LayerQK(q[:, n_text:], k, slice(n_text, k.shape[1]), slice(0, n_text))


def _projections(
    denoiser, x_t: torch.Tensor, t: torch.Tensor, rows, layers: Sequence[str]
) -> dict[str, _LayerQK]:
    """Each of ``layers``' queries and keys at inputs ``x_t`` (one forward of the untouched model)."""
    modules = dict(attention_modules(denoiser.network))
    got: dict[str, dict] = {layer: {} for layer in layers}
    text_length = [
        0
    ]  # Flux: the text length its double-stream blocks see, for the single-stream ones after
    handles = []
    for name, module in modules.items():
        if type(module).__name__ == "FluxAttention":

            def inputs(module, args, kwargs, layer=name):
                text = kwargs.get("encoder_hidden_states")
                if text is not None:
                    text_length[0] = text.shape[1]
                if layer in got:
                    got[layer] = {
                        k: (v.detach().float() if isinstance(v, torch.Tensor) else v)
                        for k, v in kwargs.items()
                    }
                    got[layer]["n_text"] = text_length[0]

            handles.append(module.register_forward_pre_hook(inputs, with_kwargs=True))
        elif name in got:
            parts = ("to_q", "to_k") + (
                ("add_k_proj",) if getattr(module, "add_k_proj", None) is not None else ()
            )
            for part in parts:

                def output(module, args, out, layer=name, part=part):
                    got[layer][part] = out.detach().float()

                handles.append(getattr(module, part).register_forward_hook(output))
    try:
        denoiser.predict(x_t, t, rows=rows)
    finally:
        for h in handles:
            h.remove()
    return {
        layer: _flux_qk(modules[layer], got[layer], got[layer]["n_text"])
        if "n_text" in got[layer]
        else _standard_qk(modules[layer], got[layer])
        for layer in layers
    }


def _inputs(denoiser, images, timestep, seed: int, dataset: str, x_t, t):
    """``(x_t, t, rows)``: the caller's noisy inputs, or ``images`` noised at ``timestep`` (each its seeded draw)."""
    if x_t is not None:
        if t is None:
            raise ConfigError("attention maps at given inputs x_t need their timestep indices t")
        t = (
            torch.as_tensor(t).expand(len(x_t))
            if torch.as_tensor(t).ndim == 0
            else torch.as_tensor(t)
        )
        return x_t, t, (dataset, np.arange(len(x_t)))
    if images is None or timestep is None:
        raise ConfigError("attention maps need images and a timestep, or noisy inputs x_t and t")
    batch = noisy_batch(
        denoiser, images, np.arange(len(images)), timestep, seed=seed, dataset=dataset
    )
    return batch.x_t, batch.t, batch.which


def _head_probs(qk: _LayerQK, head: int, rows=slice(None)) -> torch.Tensor:
    """softmax(q_h · K_hᵀ / √d) of one head for the image queries ``rows``: ``[B, N_q, N_k]`` (float64)."""
    q, k = qk.queries[:, rows, head].double(), qk.keys[:, :, head].double()
    return torch.softmax(
        (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5, -1
    )  # SDPA's default scale


@torch.no_grad()
def attention_maps(
    denoiser,
    images: np.ndarray | None = None,
    *,
    heads: Sequence[HeadAddress | str],
    timestep: int | None = None,
    queries: Sequence[tuple[float, float]],
    seed: int = 0,
    dataset: str = "a",
    x_t: torch.Tensor | None = None,
    t: torch.Tensor | None = None,
    registry: HeadRegistry | None = None,
) -> pd.DataFrame:
    """One row per image x head: the attention map (keys on the layer's grid, row-major) from ``queries[i]``.

    ``heads``: addresses or their strings (``"mid_block.attentions.0:3"``). The inputs: ``images`` noised at
    ``timestep`` as every analysis noises them (each image's seeded draw), or the caller's own noisy inputs ``x_t``
    at timestep indices ``t`` (then ``images`` is not needed; the ``timestep`` column is ``t``'s).

    Self- and joint-attention layers on a square grid only; a joint head's map is the attention its image query
    gives the image keys (the rest of the row goes to the text). Images are noised as everywhere else.
    """
    if any(isinstance(a, str) for a in heads):
        registry = registry or probe_registry(denoiser)
        heads = [registry.parse(a) if isinstance(a, str) else a for a in heads]
    x_t, t, which = _inputs(denoiser, images, timestep, seed, dataset, x_t, t)
    layers = _projections(denoiser, x_t, t, which, list(dict.fromkeys(a.layer for a in heads)))
    rows = []
    for address in heads:
        qk = layers[address.layer]
        n = qk.queries.shape[1]  # image query positions
        side = int(round(n**0.5))
        if side * side != n or qk.image_keys is None:
            raise ConfigError(f"{address.layer} is not self- or joint attention on a square grid")
        for i, (fy, fx) in enumerate(queries):
            row, col = min(side - 1, int(fy * side)), min(side - 1, int(fx * side))
            at = row * side + col  # only this query's row of the softmax is needed, not all N x N
            probs = _head_probs(qk, address.head, rows=slice(at, at + 1))[i, 0, qk.image_keys]
            rows.append(
                {
                    "dataset": dataset,
                    "image": i,
                    "timestep": int(t[i]),
                    "layer": address.layer,
                    "head": address.head,
                    "grid": side,
                    "query_y": row,
                    "query_x": col,
                    "map": probs.float().cpu().numpy(),
                }
            )
    return pd.DataFrame(rows)


@torch.no_grad()
def token_maps(
    denoiser,
    images: np.ndarray,
    *,
    registry: HeadRegistry,
    tokens: Sequence[str] | Sequence[Sequence[str]],
    timesteps: Sequence[int],
    seed: int = 0,
    dataset: str = "a",
) -> pd.DataFrame:
    """DAAM-style cross-attention maps: one row per image x timestep x cross- (or joint-) attention head x prompt token,
    with ``map`` the attention every query position gives that token (its column of the head's softmax over
    all keys, on the layer's query grid, row-major). ``tokens`` are the prompt's tokens (keys 0..len-1), or each
    image's own (captioned images)."""
    per_image = len(tokens) > 0 and not isinstance(tokens[0], str)
    cross = [i for i in registry.layers if i.kind in ("cross", "joint") and i.query_grid]
    rows = []
    for t in timesteps:
        batch = noisy_batch(denoiser, images, np.arange(len(images)), t, seed=seed, dataset=dataset)
        layers = _projections(denoiser, batch.x_t, batch.t, batch.which, [i.layer for i in cross])
        for info in cross:
            qk = layers[info.layer]
            for head in range(info.heads):
                probs = _head_probs(qk, head)  # [B, N_q, N_k]
                for i in range(len(probs)):
                    for j, text in enumerate(tokens[i] if per_image else tokens):
                        if text is None:  # a padding position
                            continue
                        rows.append(
                            {
                                "dataset": dataset,
                                "image": i,
                                "timestep": int(t),
                                "layer": info.layer,
                                "head": head,
                                "token": j,
                                "text": text,
                                "grid_h": info.query_grid[0],
                                "grid_w": info.query_grid[1],
                                "map": probs[i, :, qk.text_keys.start + j].float().cpu().numpy(),
                            }
                        )
    return pd.DataFrame(rows)


def token_heatmaps(maps: pd.DataFrame, size: int) -> pd.DataFrame:
    """DAAM's aggregate: per image and token, the mean over layers, heads and timesteps of the token's maps
    upsampled (bilinear) to ``size`` x ``size``. Rows: dataset, image, token, text, size, heatmap."""
    import torch.nn.functional as F

    rows = []
    for (dataset, image, token, text), g in maps.groupby(
        ["dataset", "image", "token", "text"], sort=True
    ):
        up = [
            F.interpolate(
                torch.from_numpy(np.asarray(r.map, dtype=np.float32)).view(
                    1, 1, r.grid_h, r.grid_w
                ),
                size=(size, size),
                mode="bilinear",
                align_corners=False,
            )[0, 0]
            for r in g.itertuples()
        ]
        rows.append(
            {
                "dataset": dataset,
                "image": int(image),
                "token": int(token),
                "text": text,
                "size": size,
                "heatmap": torch.stack(up).mean(0).reshape(-1).numpy(),
            }
        )
    return pd.DataFrame(rows)
