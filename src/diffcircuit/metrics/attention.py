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
- ``edge_percentile`` / ``texture_percentile``: attention-weighted mean percentile rank of the key's edge /
  texture energy within its image (0.5 under uniform attention, 1 on the image's top keys alone): which of
  the two correlated energy maps a head selects on.

Content scores (``content_log_scores``), one per probe of ``CONTENT_PROBES``: the log of the affinity
(edge, texture, object, background, intensity), the robust per-image statistic that the role null
compares with the same head's attention scored against *other* images' features (``metrics.roles``).
The attended quantity is floored at 1e-6 of its baseline (|score| ≤ 13.8); a score is NaN where the
baseline is 0 (e.g. the edge score of a flat image).
"""

from __future__ import annotations

import math

import torch

from diffcircuit.metrics.probes import PROBE_CHANNELS

__all__ = [
    "CONTENT_PROBES",
    "HEAD_METRICS",
    "MOMENT_CHANNELS",
    "PARTNER_CHANNELS",
    "content_log_scores",
    "metrics_from_moments",
    "uniform_moments",
]

HEAD_METRICS = (
    "effective_keys",
    "effective_keys_frac",
    "distance_px",
    "distance_frac",
    "edge_affinity",
    "texture_affinity",
    "object_affinity",
    "background_affinity",
    "intensity_affinity",
    "edge_percentile",
    "texture_percentile",
)
MOMENT_CHANNELS = ("one", *PROBE_CHANNELS)  # the capture prepends a constant channel
_C = {name: i for i, name in enumerate(MOMENT_CHANNELS)}
CONTENT_PROBES = ("edge", "texture", "intensity", "object", "background")
# the key channels content scores need (positions are the same on every image: the null needs no others)
PARTNER_CHANNELS = ("edge", "texture", "intensity", "intensity_sq", "object")
_MASKED = ("object", "background")  # probes that need a ground-truth mask
_FLOOR = 1e-6


def uniform_moments(maps: torch.Tensor) -> torch.Tensor:
    """U[g, f] = mean_i g_i · mean_j f_j over [1, *maps], from maps ``[B, C, h, w]`` -> ``[B, C+1, C+1]``."""
    mean = torch.nn.functional.pad(maps.flatten(2).mean(-1), (1, 0), value=1.0)  # [B, C+1]
    return mean[:, :, None] * mean[:, None, :]


def _m(moments: torch.Tensor, g: str, f: str, index: dict[str, int] = _C) -> torch.Tensor:
    return moments[..., index[g], index[f]]


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den, NaN where the baseline is 0 (e.g. edge affinity of a flat image)."""
    ok = den.abs() > 1e-12
    return torch.where(
        ok, num / torch.where(ok, den, torch.ones_like(den)), torch.full_like(num, math.nan)
    )


def _same_region(m: torch.Tensor, index: dict[str, int] = _C) -> torch.Tensor:
    # mean_i Σ_j p_ij [m_i m_j + (1 − m_i)(1 − m_j)] = 1 − mean m_i − mean a_i + 2 mean m_i a_i
    return (
        1
        - _m(m, "object", "one", index)
        - _m(m, "one", "object", index)
        + 2 * _m(m, "object", "object", index)
    )


def _sq_intensity_gap(m: torch.Tensor, index: dict[str, int] = _C) -> torch.Tensor:
    # mean_i Σ_j p_ij (L_j − L_i)² = M[1, L²] − 2 M[L, L] + M[L², 1]
    return (
        _m(m, "one", "intensity_sq", index)
        - 2 * _m(m, "intensity", "intensity", index)
        + _m(m, "intensity_sq", "one", index)
    )


def _attended_and_baseline(
    m: torch.Tensor, u: torch.Tensor, index: dict[str, int]
) -> dict[str, tuple]:
    """Per content probe: (what the head's attention gives, the same under uniform attention), oriented so
    that more is more preference (intensity: the baseline's squared gap over the attended one)."""
    return {
        "edge": (_m(m, "one", "edge", index), _m(u, "one", "edge", index)),
        "texture": (_m(m, "one", "texture", index), _m(u, "one", "texture", index)),
        "intensity": (_sq_intensity_gap(u, index), _sq_intensity_gap(m, index)),
        "object": (_same_region(m, index), _same_region(u, index)),
        "background": (1 - _m(m, "one", "object", index), 1 - _m(u, "one", "object", index)),
    }


def content_log_scores(
    moments: torch.Tensor,
    uniform: torch.Tensor,
    *,
    has_masks: bool,
    channels: tuple[str, ...] = PROBE_CHANNELS,
) -> dict[str, torch.Tensor]:
    """Log content scores (module docstring) from moments ``[..., C+1, C+1]`` over ``("one", *channels)`` and
    the uniform moments of the *same* features (broadcastable). Object and background are NaN without masks.
    Computed on the host in float64 (the logs of small ratios), whatever device the moments come from."""
    index = {name: i for i, name in enumerate(("one", *channels))}
    out = {}
    moments, uniform = (
        moments.cpu().double(),
        uniform.cpu().double(),
    )  # no float64 on an accelerator
    for probe, (num, den) in _attended_and_baseline(moments, uniform, index).items():
        num, den = torch.broadcast_tensors(num, den)
        if probe == "intensity":  # num is the baseline here: valid where it is positive
            ok = num > 1e-12
            score = (
                num.clamp_min(1e-300).log()
                - torch.maximum(den, _FLOOR * num).clamp_min(1e-300).log()
            )
        else:
            ok = den > 1e-12
            score = (
                torch.maximum(num, _FLOOR * den).clamp_min(1e-300).log()
                - den.clamp_min(1e-300).log()
            )
        if probe in _MASKED and not has_masks:
            ok = torch.zeros_like(ok)
        out[probe] = torch.where(ok, score, torch.full_like(score, math.nan))
    return out


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
    msd = (
        _m(moments, "one", "r2")
        - 2 * (_m(moments, "y", "y") + _m(moments, "x", "x"))
        + _m(moments, "r2", "one")
    )
    distance = msd.clamp_min(0).sqrt()
    diagonal = math.hypot(grid[0] - 1, grid[1] - 1) or 1.0
    nan = torch.full_like(distance, math.nan)
    out = {
        "effective_keys": perplexity,
        "effective_keys_frac": perplexity / n_keys,
        "distance_px": distance,
        "distance_frac": distance / diagonal,
        "edge_affinity": _ratio(
            _m(moments, "one", "edge"), _m(u, "one", "edge").expand_as(distance)
        ),
        "texture_affinity": _ratio(
            _m(moments, "one", "texture"), _m(u, "one", "texture").expand_as(distance)
        ),
        "intensity_affinity": _ratio(
            _sq_intensity_gap(u).expand_as(distance), _sq_intensity_gap(moments)
        ),
        "edge_percentile": _m(moments, "one", "edge_rank"),
        "texture_percentile": _m(moments, "one", "texture_rank"),
        "object_affinity": nan,
        "background_affinity": nan,
    }
    if has_masks:
        out["object_affinity"] = _ratio(_same_region(moments), _same_region(u).expand_as(distance))
        out["background_affinity"] = _ratio(
            1 - _m(moments, "one", "object"), (1 - _m(u, "one", "object")).expand_as(distance)
        )
    return out
