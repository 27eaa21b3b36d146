"""The two datasets of a run: how they are loaded (matched where they can be), what they still differ in,
and how many of their images the model was trained on.

Loading (``load_datasets``): the non-synthetic set first; then the synthetic set, in grayscale when
``synthetic_color`` is "gray", or "auto" and the other set is grayscale (every image R = G = B, as LFW's
faces), and with each image's luminance histogram matched to the other set's image of its index when
``match_histogram`` (``data.spec``).

``datasets_table``: one row per image property (``metrics.image_stats``): per dataset the mean over
images with a 95 % percentile-bootstrap CI and the SD between images; the difference b − a with
Cohen's d (pooled SD) and its percentile-bootstrap CI (2,000 resamples of the images within each dataset),
a permutation p (dataset labels shuffled over images, two-sided) and its Benjamini–Hochberg correction
over the properties. ``differs``: q < 0.05.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

from diffcircuit.data.provenance import in_training_set, read_training_record
from diffcircuit.data.spec import ImageSet, is_grayscale
from diffcircuit.errors import ConfigError
from diffcircuit.interventions.sweep import ReferenceImages
from diffcircuit.metrics.image_stats import IMAGE_PROPERTIES, image_properties
from diffcircuit.models.latent import model_images
from diffcircuit.protocol.config import MEAN_REFERENCES
from diffcircuit.stats.bootstrap import mean_ci
from diffcircuit.stats.resampling import bootstrap_counts, percentile_interval
from diffcircuit.stats.tests import cohens_d, correct_pvalues, two_sample_tests

__all__ = [
    "PROPERTY_DEFINITIONS",
    "datasets_table",
    "first_images",
    "load_datasets",
    "properties_table",
    "reference_split",
    "training_overlap",
]

PROPERTY_DEFINITIONS = {
    "color_deviation": "mean |channel − pixel's channel mean| over pixels and channels, in [0, 1] units (0: grayscale)",
    "edge_energy": "mean Sobel gradient magnitude of luminance (the edge probe)",
    "texture_energy": "mean (L − G₁∗L)², σ = 1 px (the texture probe)",
    "intensity_mean": "mean luminance in [0, 1]",
    "intensity_sd": "SD of luminance over pixels",
}
_N_RESAMPLES = 2000


def load_datasets(den, cfg, *, n: int | None = None) -> dict[str, ImageSet]:
    """The image sets of ``cfg`` (a ``RunConfig`` or ``DiscoverConfig``: ``data_a``, ``data_b`` (None: one set),
    ``synthetic_color``, ``match_histogram``) prepared for ``den``, the synthetic one matched as configured;
    ``n`` images each (default ``cfg.n``)."""
    specs = {k: spec for k, spec in (("a", cfg.data_a), ("b", cfg.data_b)) if spec is not None}
    common = dict(
        n=cfg.n if n is None else n,
        seed=cfg.seed,
        skip_bad=getattr(cfg, "skip_bad", False),
        batch_size=cfg.batch_size,
    )
    sets = {
        k: model_images(den, spec, **common) for k, spec in specs.items() if spec != "synthetic"
    }
    for key in [k for k, spec in specs.items() if spec == "synthetic"]:
        other = sets.get(
            "b" if key == "a" else "a"
        )  # None when both are synthetic or there is one set
        gray = cfg.synthetic_color == "gray" or (
            cfg.synthetic_color == "auto" and other is not None and is_grayscale(other.pictures)
        )
        match_to = np.asarray(other.pictures) if cfg.match_histogram and other is not None else None
        sets[key] = model_images(den, "synthetic", **common, gray=gray, match_to=match_to)
    return {k: sets[k] for k in specs}


def first_images(image_set: ImageSet, n: int) -> ImageSet:
    """The first ``n`` images of ``image_set`` (every per-image field sliced)."""

    def head(x):
        return None if x is None else x[:n]

    return dataclasses.replace(
        image_set,
        images=head(image_set.images),
        names=image_set.names[:n],
        masks=head(image_set.masks),
        pixels=head(image_set.pixels),
        captions=head(image_set.captions),
    )


def reference_split(
    sets: dict[str, ImageSet], n: int, mean_reference: str
) -> tuple[dict[str, ImageSet], dict[str, list[ReferenceImages]] | None]:
    """Evaluated images and mean ablation's reference (``mean_reference``): "heldout", each set's images after
    its first ``n`` (the evaluated ones); "pooled", those of every set; "insample" (None), the evaluated images
    themselves. Every set must hold more than ``n`` images unless "insample"."""
    if mean_reference not in MEAN_REFERENCES:
        raise ConfigError(
            f"mean_reference must be one of {', '.join(MEAN_REFERENCES)}, not {mean_reference!r}",
            "mean_reference",
        )
    evaluated = {k: first_images(s, n) for k, s in sets.items()}
    if mean_reference == "insample":
        return evaluated, None
    short = [s.spec for s in sets.values() if len(s) <= n]
    if short:
        raise ConfigError(
            f"mean_reference {mean_reference!r} takes the mean from images after the first {n} "
            f"evaluated ones, and {short[0]} has no more: lower n or use mean_reference insample",
            "n",
            "mean_reference",
        )
    held = {
        k: ReferenceImages(dataset=k, images=np.asarray(s.images[n:]), index=np.arange(n, len(s)))
        for k, s in sets.items()
    }
    return evaluated, {
        k: [held[k]] if mean_reference == "heldout" else list(held.values()) for k in sets
    }


def training_overlap(
    den, sets: dict[str, ImageSet], seed: int
) -> tuple[dict[str, int | None], dict | None]:
    """Per dataset, how many analysed images the model trained on (None: unknown), and the model's record."""
    record = read_training_record(den.model_path, den.model_path.parent)
    return {
        k: in_training_set(record, s.spec, n=len(s), seed=seed) for k, s in sets.items()
    }, record


def _d_intervals(a: np.ndarray, b: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval of Cohen's d of b − a (pooled SD, ddof 1) per column of a [n_a, k] and b [n_b, k] over
    bootstrap resamples of the images within each set (counts as ``scipy.stats.bootstrap`` draws them, a's first);
    NaN where d is undefined."""
    (n_a, k), n_b = a.shape, len(b)
    if n_a < 2 or n_b < 2:
        return np.full(k, np.nan), np.full(k, np.nan)
    counts_a, counts_b = bootstrap_counts((n_a, n_b), _N_RESAMPLES, seed)

    def moments(
        counts, x
    ):  # resampled mean and ddof-1 variance; centred first (the variance is shift-free)
        centre = x.mean(0)
        mean, square = counts @ (x - centre) / len(x), counts @ (x - centre) ** 2 / len(x)
        var = (square - mean**2) * len(x) / (len(x) - 1)
        tiny = (
            1e-12 * np.abs(x - centre).max(0)
        ) ** 2  # rounding of E[x²] − E[x]²: a resample of equal values has none
        return mean + centre, np.where(var > tiny, var, 0.0)

    (mean_a, var_a), (mean_b, var_b) = moments(counts_a, a), moments(counts_b, b)
    pooled = np.sqrt(((n_a - 1) * var_a + (n_b - 1) * var_b) / (n_a + n_b - 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        low, high = percentile_interval((mean_b - mean_a) / pooled, 0.95)
    defined = np.isfinite([cohens_d(b[:, j], a[:, j]) for j in range(k)])
    return np.where(defined, low, np.nan), np.where(defined, high, np.nan)


def _side(values: np.ndarray, suffix: str, seed: int) -> dict:
    mean, low, high = mean_ci(values, seed=seed)
    return {
        f"mean_{suffix}": mean,
        f"ci_low_{suffix}": low,
        f"ci_high_{suffix}": high,
        f"sd_{suffix}": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
        f"n_{suffix}": len(values),
    }


def datasets_table(
    sets: dict[str, ImageSet], *, seed: int = 0, correction: str = "fdr_bh"
) -> pd.DataFrame:
    """One row per image property: both datasets' means with CIs, and b − a as Cohen's d with CI and p."""
    return properties_table(
        {k: image_properties(s.pictures) for k, s in sets.items()}, seed=seed, correction=correction
    )


def properties_table(
    values: dict[str, dict[str, np.ndarray]], *, seed: int = 0, correction: str = "fdr_bh"
) -> pd.DataFrame:
    """``datasets_table`` from the properties' values per image (``values[dataset][property]`` ``[n]``): every
    property on the same resamples and relabellings of the images."""
    a, b = (
        np.column_stack([values[k][name] for name in IMAGE_PROPERTIES]).astype(np.float64)
        for k in ("a", "b")
    )
    both = len(a) > 1 and len(b) > 1
    tests = two_sample_tests(b, a, seed=seed) if both else [None] * len(IMAGE_PROPERTIES)
    lows, highs = _d_intervals(a, b, seed)
    rows = []
    for j, (name, test) in enumerate(zip(IMAGE_PROPERTIES, tests)):
        rows.append(
            {
                "property": name,
                "definition": PROPERTY_DEFINITIONS[name],
                **_side(a[:, j], "a", seed),
                **_side(b[:, j], "b", seed),
                "difference": float(b[:, j].mean() - a[:, j].mean()),
                "cohens_d": cohens_d(b[:, j], a[:, j]) if both else float("nan"),
                "d_ci_low": lows[j],
                "d_ci_high": highs[j],
                "p_value": test.p_value if test else float("nan"),
                "p_floor": test.p_floor if test else float("nan"),
                "n_permutations": test.n_resamples if test else 0,
            }
        )
    frame = pd.DataFrame(rows)
    tested = frame.p_value.notna().to_numpy()
    frame["p_corrected"] = np.nan
    frame.loc[tested, "p_corrected"] = correct_pvalues(frame.p_value[tested].to_numpy(), correction)
    frame["differs"] = frame.p_corrected < 0.05
    return frame
