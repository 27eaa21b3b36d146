"""Probe features of the clean image (``metrics.probes``), against hand-made images and direct SciPy computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from diffcircuit.metrics.probes import PROBE_CHANNELS, ProbeFeatures, _percentile, luminance


def _col(name):
    return PROBE_CHANNELS.index(name)


def test_probe_maps_are_what_they_say():
    x0 = torch.full((1, 3, 8, 8), -1.0)
    x0[..., 4:] = 1.0  # left half black, right half white: one vertical edge
    maps = ProbeFeatures(x0)((8, 8))[0]
    lum = maps[_col("intensity")]
    assert torch.allclose(lum[:, :4], torch.zeros(8, 4)) and torch.allclose(
        lum[:, 4:], torch.ones(8, 4), atol=1e-6
    )
    edge = maps[_col("edge")]
    assert edge[:, 3:5].min() > 0 and edge[:, :2].abs().max() == 0 and edge[:, 6:].abs().max() == 0
    assert torch.allclose(maps[_col("intensity_sq")], lum**2)
    ys = maps[_col("y")][:, 0]
    assert torch.allclose(ys, torch.arange(8.0) - 3.5)


def test_percentile_ranks_by_search_equal_the_pairwise_definition():
    g = torch.Generator().manual_seed(0)
    maps = torch.randint(0, 6, (3, 9, 9), generator=g).float()  # many ties
    maps[1] = torch.randn(9, 9, generator=g)
    flat = maps.flatten(1)
    below = (flat[:, :, None] > flat[:, None, :]).sum(-1).float()  # the definition, pair by pair
    ties = (flat[:, :, None] == flat[:, None, :]).sum(-1).float()
    expected = ((below + (ties - 1) / 2) / (flat.shape[1] - 1)).view_as(maps)
    torch.testing.assert_close(_percentile(maps), expected, atol=0, rtol=0)
    with_nan = maps.clone()
    with_nan[0, 0, 0] = float("nan")
    assert torch.isfinite(_percentile(with_nan)[1:]).all()


@pytest.mark.parametrize("grid", [(8, 8), (4, 4), (4, 2)])
def test_probe_maps_on_a_coarser_grid_are_cell_means_of_scipy_filters(grid):
    """A random colour image with an object mask, on grids coarser than the pixels: each channel equals a direct
    computation (luminance weights, Sobel / 8 and a σ = 1 Gaussian with replicate edges, cell means, centred
    positions, scipy's mean ranks)."""
    from scipy.stats import rankdata

    rng = np.random.default_rng(0)
    x0 = rng.uniform(-1, 1, (2, 3, 8, 8))
    mask = np.zeros((2, 8, 8), bool)
    mask[0, 1:5, 2:7] = True
    mask[1, 6:, :3] = True
    maps = ProbeFeatures(torch.tensor(x0, dtype=torch.float32), torch.from_numpy(mask))(grid)
    h, w = grid
    assert maps.shape == (2, len(PROBE_CHANNELS), h, w)
    fy, fx = 8 // h, 8 // w
    for b in range(2):
        x = (x0[b] + 1) / 2
        lum = 0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]
        edge = np.hypot(
            ndimage.sobel(lum, axis=0, mode="nearest") / 8,
            ndimage.sobel(lum, axis=1, mode="nearest") / 8,
        )
        texture = (lum - ndimage.gaussian_filter(lum, sigma=1.0, mode="nearest", truncate=3.0)) ** 2

        def cells(a, fy=fy, fx=fx):
            return a.reshape(h, fy, w, fx).mean((1, 3))

        rows, cols = np.meshgrid(
            np.arange(h) - (h - 1) / 2, np.arange(w) - (w - 1) / 2, indexing="ij"
        )
        expected = {
            "y": rows,
            "x": cols,
            "r2": rows**2 + cols**2,
            "edge": cells(edge),
            "texture": cells(texture),
            "intensity": cells(lum),
            "intensity_sq": cells(lum) ** 2,
            "object": cells(mask[b].astype(float)),
            "edge_rank": ((rankdata(cells(edge)) - 1) / (h * w - 1)).reshape(h, w),
            "texture_rank": ((rankdata(cells(texture)) - 1) / (h * w - 1)).reshape(h, w),
        }
        for name, value in expected.items():
            np.testing.assert_allclose(
                maps[b, _col(name)].double().numpy(), value, rtol=1e-4, atol=1e-6, err_msg=name
            )


def test_luminance_weighs_colour_channels_and_averages_others():
    x0 = torch.tensor([1.0, -1.0, 0.0]).view(1, 3, 1, 1)  # (R, G, B) = (1, 0, 0.5) in [0, 1]
    assert luminance(x0).item() == pytest.approx(0.299 + 0.114 * 0.5)
    two = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)  # not RGB: the plain mean of (1, 0.5)
    assert luminance(two).item() == pytest.approx(0.75)


def test_features_are_cached_per_grid_and_objects_are_zero_without_masks():
    pf = ProbeFeatures(torch.zeros(1, 1, 4, 4))
    assert pf((2, 2)) is pf((2, 2)) and not pf.has_masks
    assert pf((2, 2))[0, _col("object")].abs().max() == 0
