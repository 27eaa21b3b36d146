"""The run's two datasets: matched loading, the datasets table, training-set overlap, config checks."""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffcircuit import DiffcircuitError, ImageSet, RunConfig
from diffcircuit.protocol.datasets import datasets_table, load_datasets, training_overlap

EMBEDDED = (
    Path(__file__).resolve().parents[2]
    / "src"
    / "diffcircuit"
    / "models"
    / "embedded"
    / "tiny-ddpm-32"
)


def _den(model_path: Path = EMBEDDED / "unet"):
    return types.SimpleNamespace(codec=None, sample_size=16, in_channels=3, model_path=model_path)


def _flat(levels) -> ImageSet:
    """Uniform gray images of the given intensities in [0, 1]: every property is known exactly."""
    x = np.repeat(np.asarray(levels, np.float32)[:, None, None, None] * 2 - 1, 3, axis=1) * np.ones(
        (1, 3, 8, 8), np.float32
    )
    return ImageSet(spec="x", images=x, names=tuple(map(str, range(len(x)))))


def test_the_table_gives_cohens_d_of_b_minus_a_with_an_interval_and_a_test():
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0.2, 0.5, 30), rng.uniform(0.4, 0.8, 40)
    table = datasets_table({"a": _flat(a), "b": _flat(b)}, seed=0).set_index("property")
    row = table.loc["intensity_mean"]
    # independent: the intensity of a flat image is its level (float32 round trip), d with the pooled SD (ddof 1)
    a32, b32 = (np.float32(a) * 2 - 1 + 1) / 2, (np.float32(b) * 2 - 1 + 1) / 2
    pooled = np.sqrt((29 * a32.var(ddof=1) + 39 * b32.var(ddof=1)) / 68)
    assert row.cohens_d == pytest.approx((b32.mean() - a32.mean()) / pooled, rel=1e-5)
    assert row.mean_a == pytest.approx(a32.mean(), rel=1e-6) and row.n_b == 40
    assert row.d_ci_low < row.cohens_d < row.d_ci_high and row.ci_low_a < row.mean_a < row.ci_high_a
    from scipy.stats import ttest_ind

    assert row.p_value < 0.01 and ttest_ind(b32, a32).pvalue < 0.01 and bool(row.differs)
    # flat gray images have no colour, edges or texture (edges and texture up to float32 convolution residue)
    for name in ("color_deviation", "edge_energy", "texture_energy", "intensity_sd"):
        assert table.loc[name].mean_a == pytest.approx(0, abs=1e-8) and table.loc[
            name
        ].mean_b == pytest.approx(0, abs=1e-8)
    assert not table.loc[
        ["color_deviation", "intensity_sd"]
    ].differs.any()  # exactly 0: d undefined, p = 1


def test_identical_datasets_differ_in_nothing():
    rng = np.random.default_rng(1)
    same = _flat(rng.uniform(0, 1, 20))
    table = datasets_table({"a": same, "b": same}, seed=0)
    assert not table.differs.any()
    assert np.allclose(table.cohens_d.fillna(0), 0)


def _folder(tmp_path, colour: bool) -> str:
    rng = np.random.default_rng(2)
    for i in range(4):
        pixels = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
        if not colour:
            pixels[..., 1] = pixels[..., 2] = pixels[..., 0]
        Image.fromarray(pixels).save(tmp_path / f"{i}.png")
    return str(tmp_path)


def test_auto_renders_synthetic_gray_exactly_when_the_other_set_is_gray(tmp_path):
    cases = [
        (dict(), "gray"),
        (dict(synthetic_color="color"), "color"),
        (dict(data_b="synthetic"), "color"),
        (dict(data_b=_folder(tmp_path, colour=True)), "color"),
        (dict(data_b="nonfaces", synthetic_color="gray"), "gray"),
    ]
    for overrides, rendering in cases:
        sets = load_datasets(_den(), RunConfig(n=4, ablate_n=2, **overrides))
        assert sets["a"].rendering == rendering, overrides
    gray_folder = tmp_path / "gray"
    gray_folder.mkdir()
    sets = load_datasets(
        _den(),
        RunConfig(n=4, ablate_n=2, data_b=_folder(gray_folder, colour=False), match_histogram=True),
    )
    assert sets["a"].rendering == "gray+histogram-matched"
    control = load_datasets(_den(), RunConfig(n=4, ablate_n=2, data_a="nonfaces"))
    assert control["a"].rendering is None and control["a"].spec == "nonfaces"


def test_training_overlap_of_the_shipped_model_and_of_a_model_without_a_record(tmp_path):
    sets = load_datasets(_den(), RunConfig())
    assert training_overlap(_den(), sets, 0)[0] == {"a": 0, "b": 0}
    control = load_datasets(_den(), RunConfig(data_a="nonfaces", n=100))
    assert training_overlap(_den(), control, 0)[0] == {"a": 0, "b": 0}
    assert training_overlap(_den(tmp_path / "unet"), sets, 0) == ({"a": None, "b": None}, None)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(synthetic_color="sepia"), "synthetic_color"),
        (dict(match_histogram=True, data_b="synthetic"), "match_histogram"),
        (dict(match_histogram=True, data_a="nonfaces"), "match_histogram"),
        (dict(mean_reference="outside"), "mean_reference"),
        (dict(n=16, ablate_n=16), "mean_reference"),
        (
            dict(n=8, ablate_n=16, analyses=("ablation",), ablation_methods=("mean",)),
            "mean_reference",
        ),
    ],
)
def test_bad_data_options_name_their_field(kwargs, match):
    with pytest.raises(DiffcircuitError, match=match):
        RunConfig(**kwargs)


def test_a_config_without_mean_ablation_needs_no_held_out_images():
    RunConfig(n=8, ablate_n=16, ablation_methods=("zero",), analyses=("ablation",))
    RunConfig(n=8, ablate_n=16, mean_reference="insample")
    assert RunConfig(n=2, ablate_n=1).mean_reference == "heldout"


def test_property_statistics_equal_scipys_on_the_same_seed():
    """Cohen's d's interval is scipy's unpaired percentile bootstrap of d (2,000 resamples, seed 3), the p scipy's
    label-permutation test (9,999 relabellings, seed 3), every property on the same draws."""
    from scipy import stats

    from diffcircuit.metrics.image_stats import IMAGE_PROPERTIES
    from diffcircuit.protocol.datasets import properties_table

    rng = np.random.default_rng(7)
    values = {
        k: {
            p: rng.gamma(2.0 + (k == "b") * (j % 2), 1.0, n) for j, p in enumerate(IMAGE_PROPERTIES)
        }
        for k, n in (("a", 40), ("b", 30))
    }
    table = properties_table(values, seed=3).set_index("property")

    def d(a, b, axis=-1):
        na, nb = a.shape[axis], b.shape[axis]
        pooled = np.sqrt(
            ((na - 1) * a.var(axis=axis, ddof=1) + (nb - 1) * b.var(axis=axis, ddof=1))
            / (na + nb - 2)
        )
        return (b.mean(axis=axis) - a.mean(axis=axis)) / pooled

    for p in IMAGE_PROPERTIES:
        a, b = values["a"][p], values["b"][p]
        ref = stats.bootstrap(
            (a, b),
            d,
            n_resamples=2000,
            method="percentile",
            vectorized=True,
            random_state=np.random.default_rng(3),
        )
        assert (table.loc[p].d_ci_low, table.loc[p].d_ci_high) == pytest.approx(
            tuple(ref.confidence_interval), rel=1e-9
        )
        test = stats.permutation_test(
            (b, a),
            lambda x, y, axis: x.mean(axis) - y.mean(axis),
            vectorized=True,
            n_resamples=9999,
            random_state=np.random.default_rng(3),
        )
        assert table.loc[p].p_value == pytest.approx(test.pvalue, rel=1e-12)


@pytest.mark.filterwarnings(
    "ignore:invalid value encountered:RuntimeWarning"
)  # resamples with d = ±inf meet numpy's reductions, by design of the test
def test_cohens_d_interval_of_three_images_keeps_scipys_infinite_bounds():
    """Three images a set: some resamples repeat one image (SD 0), so d is ±inf there, as scipy computes it."""
    from scipy import stats

    from diffcircuit.metrics.image_stats import IMAGE_PROPERTIES
    from diffcircuit.protocol.datasets import properties_table

    rng = np.random.default_rng(8)
    values = {k: {p: rng.uniform(0, 1, 3) for p in IMAGE_PROPERTIES} for k in "ab"}
    table = properties_table(values, seed=2).set_index("property")

    def d(a, b, axis=-1):
        pooled = np.sqrt((a.var(axis=axis, ddof=1) + b.var(axis=axis, ddof=1)) / 2)
        with np.errstate(divide="ignore", invalid="ignore"):
            return (b.mean(axis=axis) - a.mean(axis=axis)) / pooled

    for p in IMAGE_PROPERTIES:
        ref = stats.bootstrap(
            (values["a"][p], values["b"][p]),
            d,
            n_resamples=2000,
            method="percentile",
            vectorized=True,
            random_state=np.random.default_rng(2),
        )
        got = (table.loc[p].d_ci_low, table.loc[p].d_ci_high)
        assert got == pytest.approx(tuple(ref.confidence_interval), rel=1e-9, nan_ok=True)
