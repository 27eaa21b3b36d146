"""The conditioning a conditional denoiser is fed besides (x_t, t), as the ``Denoiser`` passes it on every call.

A ``Conditioning`` is the forward's keyword inputs with a batch axis of 1 (a prompt's embeddings, a class label, a
pooled summary) and what they are in words; ``conditioning_kwargs`` expands it to a batch, or, for a captioned
dataset (``Captions``: one row per image), takes each image's own row. The network stays as diffusers built it:
nothing is attached to it.

Where a conditioning comes from: ``models.needs`` (what a network's forward needs, its unconditional input) and
``models.prompts`` (prompts and embeddings files, encoded as each family's pipeline encodes them).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from diffcircuit.errors import ConfigError

__all__ = ["Captions", "Conditioning", "conditioning_kwargs"]


@dataclass(frozen=True)
class Conditioning:
    """Forward keyword inputs with a batch dimension of 1, what they are in words, and the prompt's tokens
    (the cross-attention keys that carry text: start, words, end; padding left out, or named None where real
    tokens follow it, as SD3's T5 tokens follow CLIP's padded 77)."""

    kwargs: dict[str, torch.Tensor | dict]
    description: str
    tokens: tuple[str | None, ...] = ()
    unconditional: Conditioning | None = (
        None  # guidance's other branch, when the embeddings file gives it
    )


@dataclass(frozen=True)
class Captions:
    """A captioned dataset's per-image conditioning: ``conditioning.kwargs`` with one row per image, and each
    image's prompt tokens."""

    conditioning: Conditioning
    tokens: tuple[tuple[str | None, ...], ...]

    def key_counts(self, rows) -> torch.Tensor | None:
        """Each image's number of unmasked text keys where captions are masked per image (PixArt), else None."""
        mask = self.conditioning.kwargs.get("encoder_attention_mask")
        return (
            None
            if mask is None
            else mask[torch.as_tensor(np.asarray(rows), dtype=torch.long)].sum(1)
        )


def conditioning_kwargs(
    conditioning: Conditioning, batch: int, device: torch.device, rows: torch.Tensor | None = None
) -> dict:
    """The forward keyword inputs of ``conditioning`` for a batch: its rows ``rows`` (per-image conditioning,
    one row per batch row), or its one row expanded to ``batch`` rows; nested dicts (SDXL's
    ``added_cond_kwargs``) likewise."""

    def expand(value):
        if isinstance(value, dict):
            return {k: expand(v) for k, v in value.items()}
        if not isinstance(value, torch.Tensor):
            return value
        if rows is not None:
            return value[rows.to(value.device)].to(device)
        return value.to(device).expand(batch, *value.shape[1:])

    if rows is not None and len(rows) != batch:
        raise ConfigError(f"a batch of {batch} images was given {len(rows)} captioned rows")
    return {name: expand(value) for name, value in conditioning.kwargs.items()}
