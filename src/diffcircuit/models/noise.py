"""Noised inputs, the one way every analysis makes them: each image's own seeded noise draw at a timestep.

An image's noise ε is a function of its identity alone — (seed, a label, its index, the timestep) — so a
result never depends on the batch size or on which other images run beside it, and two analyses that
noise the same image at the same timestep see the same x_t = √ᾱ_t·x₀ + √(1−ᾱ_t)·ε.

``noisy_batch`` noises the images of one batch; ``noisy_batches`` walks a whole image set, timestep by
timestep (or batch by batch), so that the batch loop is written once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from diffcircuit.models.diffusion import add_noise, model_device

__all__ = ["NoisyBatch", "batch_noise", "batch_rows", "image_noise", "noisy_batch", "noisy_batches"]


def _label(dataset: str) -> int:
    return int.from_bytes(hashlib.sha256(dataset.encode()).digest()[:8], "little")


def image_noise(
    shape: Sequence[int], *, seed: int, dataset: str, image: int, timestep: int
) -> torch.Tensor:
    """The noise draw for one image at one timestep: a function of its identity alone.

    ``dataset`` is any label (hashed whole, so "a/noise/x" and "a/noise/y" draw different noise).
    """
    key = [seed, _label(dataset), image, timestep]
    state = int(np.random.SeedSequence(key).generate_state(1, dtype=np.uint64)[0] % (2**63))
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(state))


def batch_noise(
    shape: Sequence[int], *, seed: int, dataset: str, images, timestep: int
) -> torch.Tensor:
    """``image_noise`` for each image index in ``images``, stacked: ``[len(images), *shape]``."""
    return torch.stack(
        [
            image_noise(shape, seed=seed, dataset=dataset, image=int(i), timestep=timestep)
            for i in images
        ]
    )


@dataclass(frozen=True, eq=False)
class NoisyBatch:
    """One batch of images noised at one timestep, on the model's device."""

    dataset: str  # whose images these are (a captioned dataset's rows get their own captions)
    rows: np.ndarray  # the images' indices in their dataset, in batch order
    timestep: int
    x0: torch.Tensor  # [batch, C, H, W]
    eps: torch.Tensor  # [batch, C, H, W], each image's own draw
    t: torch.Tensor  # [batch] timestep indices (long)
    x_t: torch.Tensor  # [batch, C, H, W]

    @property
    def which(self) -> tuple[str, np.ndarray]:
        """``(dataset, rows)``: what ``Denoiser.predict(..., rows=...)`` takes."""
        return self.dataset, self.rows


def noisy_batch(
    denoiser, x0, rows, timestep: int, *, seed: int, dataset: str, noise: str | None = None
) -> NoisyBatch:
    """Images ``x0`` ``[batch, C, H, W]`` (rows ``rows`` of ``dataset``) noised at ``timestep``, with the noise
    keyed by ``noise`` (default ``dataset``: e.g. activation patching gives a source and its receiver one draw)."""
    device = model_device(denoiser.network)
    rows = np.asarray(rows, dtype=np.int64)
    x0 = torch.as_tensor(
        np.asarray(x0, dtype=np.float32) if not isinstance(x0, torch.Tensor) else x0
    ).to(device)
    eps = batch_noise(
        x0.shape[1:], seed=seed, dataset=noise or dataset, images=rows, timestep=timestep
    ).to(device)
    t = torch.full((len(rows),), int(timestep), dtype=torch.long, device=device)
    return NoisyBatch(
        dataset, rows, int(timestep), x0, eps, t, add_noise(x0, eps, t, denoiser.alphas_cumprod)
    )


def batch_rows(n: int, batch_size: int, first: int = 0) -> list[np.ndarray]:
    """Positions ``0..n-1`` cut into batches of at most ``batch_size``, offset by ``first``."""
    return [
        np.arange(lo, min(lo + batch_size, n)) + first for lo in range(0, n, max(1, batch_size))
    ]


def noisy_batches(
    denoiser,
    images,
    *,
    timesteps: Sequence[int],
    seed: int,
    dataset: str,
    batch_size: int,
    first: int = 0,
    noise: str | None = None,
    by_timestep: bool = True,
) -> Iterator[NoisyBatch]:
    """Every batch of ``images`` (rows ``first``.. of ``dataset``) at every timestep: all batches of a timestep
    before the next timestep (``by_timestep``), or all timesteps of a batch before the next batch. ``images`` is
    read a batch at a time (a lazily decoded image set stays lazy)."""
    batches = batch_rows(len(images), batch_size)
    pairs = (
        [(t, b) for t in timesteps for b in batches]
        if by_timestep
        else [(t, b) for b in batches for t in timesteps]
    )
    for t_val, local in pairs:
        x0 = images[int(local[0]) : int(local[-1]) + 1]
        yield noisy_batch(
            denoiser, x0, local + first, int(t_val), seed=seed, dataset=dataset, noise=noise
        )
