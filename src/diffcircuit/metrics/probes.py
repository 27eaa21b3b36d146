"""Per-key probe features of the *clean* image, on any attention layer's query grid.

Channels (``PROBE_CHANNELS``), each a map on the grid:

- ``y``, ``x``, ``r2``: the key's row and column (grid pixels, centred) and y² + x² — for locality;
- ``edge``: Sobel gradient magnitude of luminance, averaged over the grid cell;
- ``texture``: local high-frequency energy, (L − G₁∗L)² with G₁ a σ = 1 px Gaussian, cell-averaged;
- ``intensity``, ``intensity_sq``: cell-mean luminance L ∈ [0, 1] and its square;
- ``object``: fraction of the cell inside the ground-truth object mask (0 where no mask exists);
- ``edge_rank``, ``texture_rank``: the cell's edge / texture energy as a percentile rank among the image's
  cells on this grid, in [0, 1] (ties share their mean rank), so that their mean over the cells is 0.5.

Luminance is 0.299 R + 0.587 G + 0.114 B of the image mapped back to [0, 1].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["PROBE_CHANNELS", "ProbeFeatures", "luminance"]

PROBE_CHANNELS = (
    "y",
    "x",
    "r2",
    "edge",
    "texture",
    "intensity",
    "intensity_sq",
    "object",
    "edge_rank",
    "texture_rank",
)


def luminance(x0: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` in [-1, 1] -> ``[B, 1, H, W]`` luminance in [0, 1]."""
    x = (x0.float() + 1) / 2
    if x.shape[1] == 3:
        weights = torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)
        return (x * weights).sum(1, keepdim=True)
    return x.mean(1, keepdim=True)


def _sobel_magnitude(lum: torch.Tensor) -> torch.Tensor:
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=lum.device) / 8
    kernels = torch.stack([kx, kx.T])[:, None]  # [2, 1, 3, 3]
    grad = F.conv2d(F.pad(lum, (1, 1, 1, 1), mode="replicate"), kernels)  # [B, 2, H, W]
    return grad.pow(2).sum(1, keepdim=True).sqrt()


def _high_freq_energy(lum: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    radius = math.ceil(3 * sigma)
    t = torch.arange(-radius, radius + 1, dtype=torch.float32, device=lum.device)
    g = torch.exp(-(t**2) / (2 * sigma**2))
    g = g / g.sum()
    padded = F.pad(lum, (radius, radius, radius, radius), mode="replicate")
    blurred = F.conv2d(F.conv2d(padded, g.view(1, 1, 1, -1)), g.view(1, 1, -1, 1))
    return (lum - blurred).pow(2)


class ProbeFeatures:
    """Callable ``grid -> [B, len(PROBE_CHANNELS), h, w]`` for one batch of clean images (cached per grid)."""

    channels = PROBE_CHANNELS

    def __init__(self, x0: torch.Tensor, masks: torch.Tensor | None = None):
        lum = luminance(x0)
        obj = masks.float()[:, None] if masks is not None else torch.zeros_like(lum)
        self.has_masks = masks is not None
        self._full = torch.cat(
            [_sobel_magnitude(lum), _high_freq_energy(lum), lum, obj.to(lum.device)], 1
        )
        self._cache: dict[tuple[int, int], torch.Tensor] = {}

    def __call__(self, grid: tuple[int, int]) -> torch.Tensor:
        if grid not in self._cache:
            self._cache[grid] = self._on_grid(grid)
        return self._cache[grid]

    def _on_grid(self, grid: tuple[int, int]) -> torch.Tensor:
        h, w = grid
        b = self._full.shape[0]
        pooled = F.adaptive_avg_pool2d(
            self._full, (h, w)
        )  # [B, 4, h, w]: edge, texture, intensity, object
        edge, texture, intensity, obj = pooled.unbind(1)
        # positions centred on the grid (distances are unchanged; moments stay small for precision)
        rows = torch.arange(h, dtype=torch.float32) - (h - 1) / 2
        cols = torch.arange(w, dtype=torch.float32) - (w - 1) / 2
        y, x = torch.meshgrid(rows, cols, indexing="ij")
        y, x = y.to(pooled.device).expand(b, h, w), x.to(pooled.device).expand(b, h, w)
        return torch.stack(
            [
                y,
                x,
                y**2 + x**2,
                edge,
                texture,
                intensity,
                intensity**2,
                obj,
                _percentile(edge),
                _percentile(texture),
            ],
            1,
        )


def _percentile(maps: torch.Tensor) -> torch.Tensor:
    """``[B, h, w]`` -> each cell's mean rank among its image's cells, scaled to [0, 1] (ties share a rank):
    (cells below it + (cells equal to it − 1) / 2) / (K − 1), counted by binary search in the sorted cells,
    O(K log K) per image rather than the K x K comparison."""
    flat = maps.flatten(1).contiguous()  # [B, K]
    if not torch.isfinite(
        flat
    ).all():  # NaN equals nothing: count by comparison, as the definition reads
        below = (flat[:, :, None] > flat[:, None, :]).sum(-1).float()
        ties = (flat[:, :, None] == flat[:, None, :]).sum(-1).float()
    else:
        ordered = flat.sort(dim=1).values
        below = torch.searchsorted(ordered, flat, side="left").float()  # cells with a smaller value
        ties = torch.searchsorted(ordered, flat, side="right").float() - below
    rank = below + (ties - 1) / 2  # 0-based mean rank
    return (rank / max(flat.shape[1] - 1, 1)).view_as(maps)
