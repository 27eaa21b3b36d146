"""Head metrics from captured attention moments.

The capture records, per image and head, the entropy, the perplexity and the moments
M[g, f] = mean_i g_i Σ_j p_ij f_j over probe channels (``metrics.probes``). The same moments
under *uniform* attention, U[g, f] = mean_i g_i · mean_j f_j, are each probe's baseline, so every
affinity below is "attended / uniform": 1 means no preference, 2 twice as much as chance.

- ``distance_px``: root-mean-square distance (query-grid pixels) between a query and the keys it
  attends to, √(mean_i Σ_j p_ij |pos_j − pos_i|²) — mean *squared* distance decomposes into moments
  exactly; a one-hot row at offset δ gives δ. ``distance_frac``: the same over the grid diagonal.
- ``effective_keys``: mean over queries of exp(H_i), the number of keys a query effectively attends
  to (concentration); ``effective_keys_frac`` = effective_keys / n_keys (1.0 = uniform).
- ``edge_affinity`` / ``texture_affinity``: attention-weighted mean of the key's edge / texture
  energy over its mean over keys.
- ``object_affinity``: probability mass on keys in the same region (object or background, by the
  ground-truth mask) as the query, over the same under uniform attention. Synthetic images only.
- ``background_affinity``: mass on background keys over the background's share of keys.
- ``intensity_affinity``: mean squared luminance difference query–key under uniform attention over
  the same under the head's attention (> 1: attends to keys of similar intensity).
"""

from __future__ import annotations

import math

import torch

from diffcircuit.metrics.probes import PROBE_CHANNELS

__all__ = ["HEAD_METRICS", "MOMENT_CHANNELS", "metrics_from_moments", "uniform_moments"]

HEAD_METRICS = (
    "effective_keys", "effective_keys_frac", "distance_px", "distance_frac", "edge_affinity",
    "texture_affinity", "object_affinity", "background_affinity", "intensity_affinity",
)
MOMENT_CHANNELS = ("one", *PROBE_CHANNELS)  # the capture prepends a constant channel
_C = {name: i for i, name in enumerate(MOMENT_CHANNELS)}


def uniform_moments(maps: torch.Tensor) -> torch.Tensor:
    """U[g, f] = mean_i g_i · mean_j f_j over [1, *maps], from maps ``[B, C, h, w]`` -> ``[B, C+1, C+1]``."""
    mean = torch.nn.functional.pad(maps.flatten(2).mean(-1), (1, 0), value=1.0)  # [B, C+1]
    return mean[:, :, None] * mean[:, None, :]


def _m(moments: torch.Tensor, g: str, f: str) -> torch.Tensor:
    return moments[..., _C[g], _C[f]]


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den, NaN where the baseline is 0 (e.g. edge affinity of a flat image)."""
    ok = den.abs() > 1e-12
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.full_like(num, math.nan))


def _same_region(m: torch.Tensor) -> torch.Tensor:
    # mean_i Σ_j p_ij [m_i m_j + (1 − m_i)(1 − m_j)] = 1 − mean m_i − mean a_i + 2 mean m_i a_i
    return 1 - _m(m, "object", "one") - _m(m, "one", "object") + 2 * _m(m, "object", "object")


def _sq_intensity_gap(m: torch.Tensor) -> torch.Tensor:
    # mean_i Σ_j p_ij (L_j − L_i)² = M[1, L²] − 2 M[L, L] + M[L², 1]
    return _m(m, "one", "intensity_sq") - 2 * _m(m, "intensity", "intensity") + _m(m, "intensity_sq", "one")


def metrics_from_moments(
    moments: torch.Tensor,
    uniform: torch.Tensor,
    perplexity: torch.Tensor,
    *,
    grid: tuple[int, int],
    has_masks: bool,
) -> dict[str, torch.Tensor]:
    """Head metrics ``[B, heads]`` from moments ``[B, heads, C, C]``, uniform ``[B, C, C]``, perplexity ``[B, heads]``."""
    u = uniform[:, None]  # [B, 1, C, C]: broadcasts over heads
    n_keys = grid[0] * grid[1]
    msd = _m(moments, "one", "r2") - 2 * (_m(moments, "y", "y") + _m(moments, "x", "x")) + _m(moments, "r2", "one")
    distance = msd.clamp_min(0).sqrt()
    diagonal = math.hypot(grid[0] - 1, grid[1] - 1) or 1.0
    nan = torch.full_like(distance, math.nan)
    out = {
        "effective_keys": perplexity,
        "effective_keys_frac": perplexity / n_keys,
        "distance_px": distance,
        "distance_frac": distance / diagonal,
        "edge_affinity": _ratio(_m(moments, "one", "edge"), _m(u, "one", "edge").expand_as(distance)),
        "texture_affinity": _ratio(_m(moments, "one", "texture"), _m(u, "one", "texture").expand_as(distance)),
        "intensity_affinity": _ratio(_sq_intensity_gap(u).expand_as(distance), _sq_intensity_gap(moments)),
        "object_affinity": nan,
        "background_affinity": nan,
    }
    if has_masks:
        out["object_affinity"] = _ratio(_same_region(moments), _same_region(u).expand_as(distance))
        out["background_affinity"] = _ratio(1 - _m(moments, "one", "object"), (1 - _m(u, "one", "object")).expand_as(distance))
    return out
