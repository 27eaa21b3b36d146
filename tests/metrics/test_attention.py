"""Head metrics from moments, checked against their pairwise definitions on explicit attention."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffcircuit.metrics.attention import metrics_from_moments, uniform_moments
from diffcircuit.metrics.probes import PROBE_CHANNELS, ProbeFeatures


def _features(h=6, w=6, seed=0, with_mask=True):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(1, 3, h * 2, w * 2, generator=g) * 2 - 1
    mask = torch.zeros(1, h * 2, w * 2, dtype=torch.bool)
    mask[:, 2:8, 3:9] = True
    pf = ProbeFeatures(x0, mask if with_mask else None)
    return pf, pf((h, w))[0].flatten(1).T  # [K, C]


def _metrics(p: torch.Tensor, pf, grid, with_mask=True):
    """Metrics for one head with explicit attention p [Q, K] on the grid."""
    feats = pf(grid)[0].flatten(1).T  # [K, C]
    feats = torch.cat([torch.ones(feats.shape[0], 1), feats], 1)  # moments are over [1, *features]
    moments = torch.einsum("qk,kf,qg->gf", p, feats, feats) / p.shape[0]
    entropy = torch.special.entr(p).sum(-1)
    return metrics_from_moments(
        moments[None, None],
        uniform_moments(pf(grid)),
        entropy.exp().mean()[None, None],
        grid=grid,
        has_masks=with_mask,
    )


def _col(name):
    return PROBE_CHANNELS.index(name)


def _random_attention(k, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(k, k, generator=g) * 2, -1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_pairwise_definitions(seed):
    grid = (6, 6)
    pf, feats = _features(seed=seed)
    p = _random_attention(36, seed)
    m = {k: v.item() for k, v in _metrics(p, pf, grid).items()}
    yy, xx = np.meshgrid(np.arange(6), np.arange(6), indexing="ij")
    pos = np.stack([yy.ravel(), xx.ravel()], 1).astype(float)
    d2 = ((pos[:, None] - pos[None]) ** 2).sum(-1)
    P = p.double().numpy()
    assert m["distance_px"] == pytest.approx(math.sqrt((P * d2).sum(1).mean()), rel=1e-5)
    assert m["distance_frac"] == pytest.approx(m["distance_px"] / math.hypot(5, 5), rel=1e-6)
    f = feats.double().numpy()
    edge, obj, lum = f[:, _col("edge")], f[:, _col("object")], f[:, _col("intensity")]
    assert m["edge_affinity"] == pytest.approx((P @ edge).mean() / edge.mean(), rel=1e-5)
    same = obj[:, None] * obj[None] + (1 - obj[:, None]) * (1 - obj[None])
    assert m["object_affinity"] == pytest.approx((P * same).sum(1).mean() / same.mean(), rel=1e-5)
    assert m["background_affinity"] == pytest.approx(
        (P @ (1 - obj)).mean() / (1 - obj).mean(), rel=1e-5
    )
    gap = (lum[None] - lum[:, None]) ** 2
    assert m["intensity_affinity"] == pytest.approx(gap.mean() / (P * gap).sum(1).mean(), rel=1e-4)
    assert m["effective_keys"] == pytest.approx(np.exp(-(P * np.log(P)).sum(1)).mean(), rel=1e-5)


def test_one_hot_attention_distance_is_the_offset():
    """Every query attends to one key 5 px away (3 rows, 4 columns, signs keeping it on the grid)."""
    h = w = 10
    pf, _ = _features(h, w)
    p = torch.zeros(h * w, h * w)
    for y in range(h):
        for x in range(w):
            ky, kx = y + (3 if y < 5 else -3), x + (4 if x < 5 else -4)
            p[y * w + x, ky * w + kx] = 1
    m = _metrics(p, pf, (h, w))
    assert m["distance_px"].item() == pytest.approx(5.0, abs=1e-4)
    assert m["effective_keys"].item() == pytest.approx(1.0)


def test_uniform_attention_has_unit_affinities():
    pf, _ = _features()
    p = torch.full((36, 36), 1 / 36)
    m = _metrics(p, pf, (6, 6))
    for name in (
        "edge_affinity",
        "texture_affinity",
        "object_affinity",
        "background_affinity",
        "intensity_affinity",
    ):
        assert m[name].item() == pytest.approx(1.0, rel=1e-5), name
    assert m["effective_keys_frac"].item() == pytest.approx(1.0, rel=1e-6)


def test_object_probes_are_nan_without_masks():
    pf, _ = _features(with_mask=False)
    m = _metrics(torch.full((36, 36), 1 / 36), pf, (6, 6), with_mask=False)
    assert math.isnan(m["object_affinity"].item()) and math.isnan(m["background_affinity"].item())


def test_percentiles_are_the_attended_mean_rank_of_the_keys_energy():
    grid = (6, 6)
    pf, feats = _features(seed=3)
    p = _random_attention(36, 3)
    m = _metrics(p, pf, grid)
    from scipy.stats import rankdata

    P = p.double().numpy()
    for name in ("edge", "texture"):
        values = feats[:, _col(name)].double().numpy()
        rank = (rankdata(values) - 1) / (len(values) - 1)
        assert m[f"{name}_percentile"].item() == pytest.approx((P @ rank).mean(), rel=1e-5)
    assert _metrics(torch.full((36, 36), 1 / 36), pf, grid)[
        "edge_percentile"
    ].item() == pytest.approx(0.5)
