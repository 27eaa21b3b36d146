"""Low-level image properties, one value per image: what two datasets differ in besides their content.

With luminance L = 0.299 R + 0.587 G + 0.114 B of the image mapped to [0, 1] (``probes.luminance``) and
the probe maps of ``metrics.probes`` at full resolution:

- ``color_deviation``: mean over pixels and channels of |channel − the pixel's channel mean|, in float64,
  so exactly 0 for grayscale images (R = G = B) — a luminance-weighted centre would leave rounding residue;
- ``edge_energy``: mean Sobel gradient magnitude of L (the ``edge`` probe);
- ``texture_energy``: mean high-frequency energy (L − G₁∗L)², G₁ a σ = 1 px Gaussian (the ``texture`` probe);
- ``intensity_mean`` and ``intensity_sd``: mean and standard deviation (over pixels, ddof 0) of L.
"""

from __future__ import annotations

import numpy as np
import torch

from diffcircuit.metrics.probes import PROBE_CHANNELS, ProbeFeatures, luminance

__all__ = ["IMAGE_PROPERTIES", "image_properties"]

IMAGE_PROPERTIES = (
    "color_deviation",
    "edge_energy",
    "texture_energy",
    "intensity_mean",
    "intensity_sd",
)


@torch.no_grad()
def _batch_properties(x: torch.Tensor) -> dict[str, np.ndarray]:
    """``x`` ``[B, C, H, W]`` in [-1, 1] -> each property ``[B]``."""
    lum = luminance(x)  # [B, 1, H, W] in [0, 1]
    maps = ProbeFeatures(x)(
        tuple(x.shape[-2:])
    )  # [B, channels, H, W]: pooling onto the image's own grid is identity
    edge, texture = maps[:, PROBE_CHANNELS.index("edge")], maps[:, PROBE_CHANNELS.index("texture")]
    x64 = (x.double() + 1) / 2
    colour = (x64 - x64.mean(1, keepdim=True)).abs().flatten(1).mean(1)
    flat = lum.flatten(1).double()
    return {
        "color_deviation": colour,
        "edge_energy": edge.flatten(1).mean(1),
        "texture_energy": texture.flatten(1).mean(1),
        "intensity_mean": flat.mean(1),
        "intensity_sd": flat.std(1, correction=0),
    }


def image_properties(images, *, batch_size: int = 256) -> dict[str, np.ndarray]:
    """Each of ``IMAGE_PROPERTIES`` for every image of ``images`` ``[n, C, H, W]`` in [-1, 1] (an array, or
    anything sliceable such as ``LazyImages``), as float64 ``[n]``."""
    parts: dict[str, list[np.ndarray]] = {name: [] for name in IMAGE_PROPERTIES}
    for lo in range(0, len(images), batch_size):
        batch = torch.from_numpy(np.asarray(images[lo : lo + batch_size], dtype=np.float32))
        for name, values in _batch_properties(batch).items():
            parts[name].append(values.double().numpy())
    return {name: np.concatenate(values) for name, values in parts.items()}
