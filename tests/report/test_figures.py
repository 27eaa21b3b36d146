"""The report's figures say what they show: scales fitted to the data, layers named, intervals drawn."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")

from diffcircuit.metrics.roles import ROLES  # noqa: E402
from diffcircuit.report.figures import (  # noqa: E402
    _colour_range,
    ablation_bars,
    attention_gallery,
    attribution_scatter,
    entropy_heatmap,
    patching_grid,
    role_map,
)

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


def test_role_map_hatches_heads_a_layer_does_not_have_and_colours_each_role():
    roles = pd.DataFrame(
        [
            {"dataset": "a", "timestep": 500, "layer": layer, "head": h, "role": ROLES[h]}
            for layer, n in LAYERS.items()
            for h in range(n)
        ]
    )
    fig = role_map(roles)
    ax = fig.axes[0]
    grid = ax.get_images()[0].get_array()
    names = [*ROLES, "positional", "unassigned"]
    assert grid.mask[0, 2] and not grid.mask[1, 2]  # the first layer has 2 heads, the second 3
    assert [grid[1, h] for h in range(3)] == [names.index(ROLES[h]) for h in range(3)]
    assert any(p.get_hatch() == "////" for p in ax.patches)  # what shows through the masked cells


def test_attribution_scatter_plots_each_estimate_against_its_exhaustive_ablation():
    rng = np.random.default_rng(1)
    heads = [(layer, h) for layer, n in LAYERS.items() for h in range(n)]
    ablations = pd.DataFrame(
        [
            {
                "dataset": "a",
                "timestep": 500,
                "method": "zero",
                "level": "head",
                "target": f"{layer}:{h}",
                "image": i,
                "degradation_pct": rng.normal(5, 2),
            }
            for layer, h in heads
            for i in range(3)
        ]
    )
    attribution = pd.DataFrame(
        [
            {
                "dataset": "a",
                "timestep": 500,
                "method": "zero",
                "estimator": est,
                "layer": layer,
                "head": h,
                "image": i,
                "degradation_pct": rng.normal(5, 2),
            }
            for est in ("first_order", "ig_joint")
            for layer, h in heads
            for i in range(3)
        ]
    )
    fig = attribution_scatter(attribution, ablations)
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    assert "ig_joint" not in lines  # it estimates the joint ablation, not a single head's
    x, y = lines["first_order"].get_data()
    truth = ablations.groupby("target").degradation_pct.mean()
    est = attribution[attribution.estimator == "first_order"]
    est = est.assign(target=est.layer + ":" + est["head"].astype(str))
    estimate = est.groupby("target").degradation_pct.mean()
    order = [f"{layer}:{h}" for layer, h in heads]
    np.testing.assert_allclose(sorted(zip(x, y)), sorted(zip(truth[order], estimate[order])))
    dashed = [line for line in fig.axes[0].get_lines() if line.get_linestyle() == "--"]
    assert dashed and np.allclose(*dashed[0].get_data())  # the identity line


def test_the_attention_gallery_has_a_colourbar_on_the_attention_scale():
    maps = pd.DataFrame(
        [
            {
                "dataset": "a",
                "image": 0,
                "timestep": 500,
                "layer": "mid_block.attentions.0",
                "head": h,
                "grid": 2,
                "map": [0.1, 0.2, 0.3, 0.4],
                "query_x": 0,
                "query_y": 1,
            }
            for h in range(2)
        ]
    )
    pictures = pd.DataFrame(
        [{"dataset": "a", "image": 0, "pixels": np.zeros(16).tolist(), "channels": 1, "size": 4}]
    )
    fig = attention_gallery(maps, pictures, {"a": "synthetic"})
    bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(bars) == 1 and bars[0].get_ylabel() == "attention / its maximum in the map"
    assert bars[0].get_ylim() == (0.0, 1.0)
