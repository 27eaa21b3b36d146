"""Flux-style transformers that take packed latents: every 2x2 patch of a latent map is one token.

``FluxTransformer2DModel`` reads ``[batch, (h/2)·(w/2), 4·C]`` tokens, each token's position as ``img_ids``
(row, column) and the text's as ``txt_ids`` (zeros), plus, in guidance-distilled models, the guidance scale
as an input. ``Denoiser.predict`` packs a latent map ``[batch, C, h, w]`` going in (``packed_inputs``) and
unpacks the prediction coming out, exactly as ``FluxPipeline`` does, so the analyses run unchanged.
"""

from __future__ import annotations

import torch

__all__ = ["DISTILLED_GUIDANCE", "is_packed", "pack", "packed_inputs", "unpack"]

DISTILLED_GUIDANCE = 3.5  # what FluxPipeline feeds a guidance-distilled model by default


def is_packed(network: torch.nn.Module) -> bool:
    return type(network).__name__ == "FluxTransformer2DModel"


def pack(latents: torch.Tensor) -> torch.Tensor:
    """``[B, C, h, w]`` -> ``[B, (h/2)(w/2), 4C]``: each 2x2 patch a token, channel-major within it."""
    b, c, h, w = latents.shape
    return (
        latents.view(b, c, h // 2, 2, w // 2, 2)
        .permute(0, 2, 4, 1, 3, 5)
        .reshape(b, (h // 2) * (w // 2), c * 4)
    )


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of ``pack``: ``[B, (h/2)(w/2), 4C]`` -> ``[B, C, h, w]``."""
    b, _, channels = tokens.shape
    return (
        tokens.view(b, h // 2, w // 2, channels // 4, 2, 2)
        .permute(0, 3, 1, 4, 2, 5)
        .reshape(b, channels // 4, h, w)
    )


def _image_ids(h: int, w: int, like: torch.Tensor) -> torch.Tensor:
    """Each token's (0, row, column) on the packed grid: ``[(h/2)(w/2), 3]``."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=like.device, dtype=like.dtype)


def packed_inputs(
    latents: torch.Tensor, kwargs: dict, *, distilled: bool, guidance: float = DISTILLED_GUIDANCE
) -> tuple[torch.Tensor, dict]:
    """``(tokens, kwargs)`` for a packed model from a latent map ``[B, C, h, w]``: the tokens, their positions
    (``img_ids``), the text's (``txt_ids``: zeros) and, for a guidance-distilled model, the guidance scale, as
    ``FluxPipeline`` feeds them; ``kwargs`` are the call's other inputs (its text embeddings among them)."""
    h, w = latents.shape[-2:]
    kwargs = {**kwargs, "img_ids": _image_ids(h, w, latents)}
    text = kwargs.get("encoder_hidden_states")
    if text is not None and kwargs.get("txt_ids") is None:
        kwargs["txt_ids"] = torch.zeros(
            text.shape[1], 3, device=latents.device, dtype=latents.dtype
        )
    if distilled and kwargs.get("guidance") is None:
        kwargs["guidance"] = torch.full(
            (latents.shape[0],), guidance, device=latents.device, dtype=latents.dtype
        )
    return pack(latents), kwargs
