"""The report's figures say what they show: scales fitted to the data, layers named, intervals drawn."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")

from diffcircuit.report.figures import _colour_range, ablation_bars, entropy_heatmap, patching_grid  # noqa: E402

LAYERS = {"down_blocks.0.attentions.0": 2, "mid_block.attentions.0": 3}


def _heads(rng) -> pd.DataFrame:
    rows = [
        {
            "dataset": ds,
            "timestep": t,
            "layer": layer,
            "head": h,
            "image": i,
            "entropy_norm": rng.uniform(0.62, 0.97),
        }
        for ds in ("a", "b")
        for t in (100, 900)
        for layer, n in LAYERS.items()
        for h in range(n)
        for i in range(3)
    ]
    return pd.DataFrame(rows)


def test_the_entropy_scale_is_fitted_to_the_data_and_heads_are_indexed():
    heads = _heads(np.random.default_rng(0))
    assert _colour_range(heads.entropy_norm.to_numpy()) == (0.6, 1.0)
    fig = entropy_heatmap(heads, {"a": "synthetic", "b": "faces"})
    images = [im for ax in fig.axes for im in ax.get_images()]
    means = heads.groupby(
        ["dataset", "layer", "head", "timestep"]
    ).entropy_norm.mean()  # what the panels show
    expected = (np.floor(means.min() * 20) / 20, np.ceil(means.max() * 20) / 20)
    assert len({im.get_clim() for im in images}) == 1
    np.testing.assert_allclose(images[0].get_clim(), expected)
    assert expected[1] - expected[0] < 0.5  # fitted, not the 0–1 of before
    first, last = fig.axes[0], fig.axes[1]
    assert [t.get_text() for t in first.get_yticklabels()] == [
        "down_blocks.0.attn.0",
        "mid_block.attn.0",
    ]
    assert [
        t.get_text() for t in last.get_yticklabels()
    ] == []  # no layer names overprinting the first panel
    right = [c for ax in fig.axes for c in ax.child_axes if c.get_ylabel() == "head"]
    assert right and [t.get_text() for t in right[0].get_yticklabels()] == ["0", "1", "0", "1", "2"]


def test_single_head_bars_have_a_layer_legend_and_intervals():
    rng = np.random.default_rng(1)
    rows = [
        {
            "level": "head",
            "target": f"{layer}:{h}",
            "layer": layer,
            "head": h,
            "method": m,
            "image": i,
            "n_heads": 1,
            "degradation_pct": rng.normal(5, 1),
        }
        for layer, n in LAYERS.items()
        for h in range(n)
        for m in ("zero", "mean")
        for i in range(4)
    ]
    fig = ablation_bars(pd.DataFrame(rows))
    ax = fig.axes[0]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert {"down_blocks.0.attn.0", "mid_block.attn.0", "95 % t-interval over images"} <= set(
        legend
    )
    assert [t.get_text() for t in ax.get_xticklabels()] == [
        "0",
        "1",
        "0",
        "1",
        "2",
    ]  # head index within its layer


def test_patching_grid_marks_missing_heads_and_centres_its_scale():
    rows = [
        {
            "timestep": 500,
            "pair": p,
            "level": "head",
            "target": f"{layer}:{h}",
            "layer": layer,
            "head": h,
            "moved_frac": 0.1 * (h + 1) * (1 if p else -0.5),
        }
        for layer, n in LAYERS.items()
        for h in range(n)
        for p in range(2)
    ]
    fig = patching_grid(pd.DataFrame(rows))
    image = fig.axes[0].get_images()[0]
    low, high = image.get_clim()
    assert low == -high and high > 0
    grid = image.get_array()
    assert grid.mask[0, 2] and not grid.mask[1, 2]  # the first layer has no head 2
