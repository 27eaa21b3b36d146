"""One setup for every command: load the model, check the timesteps, prepare the images, give captioned images their
captions, probe the head registry — in that order, so that bad input is refused before anything is computed.

``run``, ``discover``, ``ablate``, ``calibrate``, ``cache``, ``guidance`` and ``generate`` all build their context here;
what differs between them is only which image sets they load (``images``: none, one, or the pair of a run).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from diffcircuit.data.spec import ImageSet
from diffcircuit.instrument.registry import HeadRegistry
from diffcircuit.instrument.session import probe_registry
from diffcircuit.models.latent import model_images
from diffcircuit.models.loading import Denoiser, use_captions
from diffcircuit.models.spec import ModelSpec

__all__ = ["Setup", "build_setup", "one_set"]


@dataclass(eq=False)
class Setup:
    """A command's model, its image sets (by dataset key), how their captions were used, and the head registry."""

    spec: ModelSpec
    den: Denoiser
    registry: HeadRegistry
    sets: dict[str, ImageSet] = field(default_factory=dict)
    captions: dict[str, str | None] = field(
        default_factory=dict
    )  # per dataset: how its captions were used

    def autocast(self):
        return self.spec.autocast()


def one_set(
    key: str, data: str, *, n: int, seed: int, skip_bad: bool = False
) -> Callable[[Denoiser], dict[str, ImageSet]]:
    """``images`` for ``build_setup``: one data spec (a built-in set or a folder) as dataset ``key``."""
    return lambda den: {key: model_images(den, data, n=n, seed=seed, skip_bad=skip_bad)}


def build_setup(
    spec: ModelSpec,
    *,
    timesteps: Sequence[int] = (),
    images: Callable[[Denoiser], dict[str, ImageSet]] | None = None,
    captions: bool = True,
) -> Setup:
    """The model of ``spec`` (on its device), ``timesteps`` checked against it, the image sets ``images(den)``
    makes for it (a latent model's encoded by its VAE), each captioned set's captions given to its images (unless
    ``captions`` is off), and the head registry probed on the first image (or a zero input when there is none)."""
    den = spec.load()
    if timesteps:
        den.check_timesteps(timesteps)
    sets = images(den) if images is not None else {}
    used = {
        key: use_captions(
            den, key, s.captions if captions else None, allow_pickle=spec.allow_pickle, spec=s.spec
        )
        for key, s in sets.items()
    }
    first = next(iter(sets.values()), None)
    sample = (
        None if first is None else torch.from_numpy(np.asarray(first.images[:1], dtype=np.float32))
    )
    return Setup(
        spec=spec.model_spec,
        den=den,
        registry=probe_registry(den, sample),
        sets=sets,
        captions=used,
    )
