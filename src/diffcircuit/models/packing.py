"""Flux-style transformers that take packed latents: every 2x2 patch of a latent map is one token.

``FluxTransformer2DModel`` reads ``[batch, (h/2)·(w/2), 4·C]`` tokens, each token's position as ``img_ids``
(row, column) and the text's as ``txt_ids`` (zeros), plus, in guidance-distilled models, the guidance scale
as an input. ``attach_packing`` makes such a network take and return latent maps ``[batch, C, h, w]`` like
every other denoiser, packing and unpacking exactly as ``FluxPipeline`` does, so the analyses run unchanged.
"""

from __future__ import annotations

import torch

__all__ = ["DISTILLED_GUIDANCE", "attach_packing", "is_packed", "pack", "unpack"]

DISTILLED_GUIDANCE = 3.5  # what FluxPipeline feeds a guidance-distilled model by default


def is_packed(network: torch.nn.Module) -> bool:
    return type(network).__name__ == "FluxTransformer2DModel"


def pack(latents: torch.Tensor) -> torch.Tensor:
    """``[B, C, h, w]`` -> ``[B, (h/2)(w/2), 4C]``: each 2x2 patch a token, channel-major within it."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of ``pack``: ``[B, (h/2)(w/2), 4C]`` -> ``[B, C, h, w]``."""
    b, _, channels = tokens.shape
    return tokens.view(b, h // 2, w // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, channels // 4, h, w)


def _image_ids(h: int, w: int, like: torch.Tensor) -> torch.Tensor:
    """Each token's (0, row, column) on the packed grid: ``[(h/2)(w/2), 3]``."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=like.device, dtype=like.dtype)


def attach_packing(network: torch.nn.Module, *, guidance: float = DISTILLED_GUIDANCE) -> None:
    """Hooks that pack the latent map going in and unpack the prediction coming out (module docstring)."""
    distilled = bool(getattr(network.config, "guidance_embeds", False))

    def before(module, args, kwargs):
        sample = args[0] if args else kwargs["hidden_states"]
        if sample.ndim != 4:
            return None  # already tokens: the caller packed them
        if len(args) > 1:  # net(x, t): the timestep goes by name once x is not the first positional
            kwargs = {**kwargs, "timestep": args[1]}
        h, w = sample.shape[-2:]
        ids = _image_ids(h, w, sample)
        ids._diffcircuit_unpack_to = (h, w)  # tells the output hook that this call was packed here, and the size
        kwargs = {**kwargs, "hidden_states": pack(sample), "img_ids": ids}
        text = kwargs.get("encoder_hidden_states")
        if text is not None and kwargs.get("txt_ids") is None:
            kwargs["txt_ids"] = torch.zeros(text.shape[1], 3, device=sample.device, dtype=sample.dtype)
        if distilled and kwargs.get("guidance") is None:
            kwargs["guidance"] = torch.full((sample.shape[0],), guidance, device=sample.device, dtype=sample.dtype)
        return (), kwargs

    def after(module, args, kwargs, output):
        size = getattr(kwargs.get("img_ids"), "_diffcircuit_unpack_to", None)
        if size is None:
            return None
        if hasattr(output, "sample"):
            return type(output)(sample=unpack(output.sample, *size))
        return (unpack(output[0], *size), *output[1:])

    network.register_forward_pre_hook(before, with_kwargs=True)
    network.register_forward_hook(after, with_kwargs=True)
