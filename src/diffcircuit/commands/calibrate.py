"""``diffcircuit calibrate``: does the statistics framework find differences where there are none?

Observe one image distribution, then split its images at random into two halves many times and
run, on every split, the same ratio test the protocol runs between distributions
(``stats.complexity.ratio_test``: bootstrap CI, permutation p) for every complexity measure — the
primary one first: the participation ratio of single-head mean-ablation effects, the heads needed
for 90 % of the effect, the mean normalised entropy and the mean effective-keys fraction. Both
halves come from one distribution, so the true ratio is 1: the false-positive rate at α should be
≈ α, and the CIs that are given should cover 1 in ≈ 95 % of splits.

Each rate carries a Clopper–Pearson 95 % interval over the splits (its Monte-Carlo uncertainty for
these images; the splits reuse the same images, so it says nothing of the images' own sampling
variation) and a verdict:

- "miscalibrated" when the interval excludes the nominal rate (anti-conservative or undercovering
  when the rate is on the wrong side, conservative / overcovering otherwise);
- "too few splits to tell" when it contains the nominal rate but also a rate outside the tolerance
  (false-positive rate above 2α, coverage below 0.90);
- "consistent with nominal" otherwise;
- "cannot reject at this n" / "no intervals at this n" when the test's p floor is above α or every
  interval is withheld (too few images per half), so the rate says nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import numpy as np
from scipy import stats

from diffcircuit.errors import ConfigError
from diffcircuit.interventions.ablation import targets
from diffcircuit.interventions.sweep import ablation_sweep
from diffcircuit.metrics.observe import observe
from diffcircuit.models.spec import MODEL_FIELDS, MODEL_HELP, ModelSpec
from diffcircuit.protocol.setup import build_setup, one_set
from diffcircuit.stats.complexity import (
    heads_for_fraction,
    mean_value,
    participation_ratio,
    ratio_test,
)
from diffcircuit.stats.tests import independent_p_floor

__all__ = [
    "CALIBRATE_HELP",
    "CalibrateConfig",
    "CalibrationResult",
    "MeasureCalibration",
    "RateCheck",
    "calibrate",
    "rate_verdict",
    "split_half_calibration",
]

COVERAGE = 0.95
_MEASURES = {
    "ablation_participation_ratio": participation_ratio,
    "ablation_heads_for_90pct": heads_for_fraction,
    "mean_entropy_norm": mean_value,
    "mean_effective_keys_frac": mean_value,
}
_ORDER = (
    "miscalibrated",
    "cannot reject at this n",
    "no intervals at this n",
    "too few splits to tell",
    "consistent with nominal",
)  # worst first: a measure's (and the run's) verdict is its worst


@dataclass(frozen=True, kw_only=True)
class RateCheck:
    rate: float  # count / n
    count: int
    n: int  # splits where the rate is defined (p given, or interval given)
    ci_low: float  # Clopper–Pearson 95 % over the splits
    ci_high: float
    nominal: float
    verdict: str


def rate_verdict(count: int, n: int, *, nominal: float, worst: float, kind: str) -> RateCheck:
    """The verdict on an observed rate ``count / n`` against ``nominal``; ``worst``: the tolerance limit
    (a false-positive rate above it, or a coverage below it, is a problem). ``kind``: 'fpr' or 'coverage'."""
    if n == 0:
        return RateCheck(
            rate=float("nan"),
            count=0,
            n=0,
            ci_low=float("nan"),
            ci_high=float("nan"),
            nominal=nominal,
            verdict="no intervals at this n" if kind == "coverage" else "cannot reject at this n",
        )
    ci = stats.binomtest(count, n, nominal).proportion_ci(0.95, method="exact")
    low, high = float(ci.low), float(ci.high)
    if not low <= nominal <= high:
        bad_side = (low > nominal) if kind == "fpr" else (high < nominal)
        side = (
            ("anti-conservative" if kind == "fpr" else "undercovers")
            if bad_side
            else ("conservative" if kind == "fpr" else "overcovers")
        )
        verdict = f"miscalibrated ({side})"
    elif (high > worst) if kind == "fpr" else (low < worst):
        verdict = "too few splits to tell"
    else:
        verdict = "consistent with nominal"
    return RateCheck(
        rate=count / n, count=count, n=n, ci_low=low, ci_high=high, nominal=nominal, verdict=verdict
    )


@dataclass(frozen=True, kw_only=True)
class MeasureCalibration:
    measure: str
    primary: bool
    false_positive: RateCheck
    coverage: RateCheck
    n_per_half: int
    verdict: str  # the worse of the two


def _worst(*verdicts: str) -> str:
    return min(
        verdicts, key=lambda v: next(i for i, name in enumerate(_ORDER) if v.startswith(name))
    )


@dataclass(frozen=True, kw_only=True)
class CalibrationResult:
    splits: int
    alpha: float
    n_images: int
    measures: tuple[MeasureCalibration, ...]  # the primary measure first
    verdict: str  # the worst over measures

    @property
    def false_positive_rate(self) -> float:  # of the first (primary, when run) measure
        return self.measures[0].false_positive.rate

    @property
    def coverage(self) -> float:
        return self.measures[0].coverage.rate


def _one_measure(
    name: str, rows: np.ndarray, *, splits, alpha, n_boot, n_perm, rng
) -> MeasureCalibration:
    half = len(rows) // 2
    rejected = tested = covered = intervals = 0
    can_reject = independent_p_floor(half, half, n_perm, two_sided=False, swap_ties=True) < alpha
    for _ in range(splits):
        perm = rng.permutation(len(rows))
        res = ratio_test(
            rows[perm[:half]],
            rows[perm[half : 2 * half]],
            _MEASURES[name],
            n_boot=n_boot,
            n_perm=n_perm,
            alpha=alpha,
            seed=int(rng.integers(2**31)),
        )
        if np.isfinite(res.p_value):
            tested += 1
            rejected += res.p_value < alpha
        if res.ci_withheld is None:
            intervals += 1
            covered += res.ci_low <= 1.0 <= res.ci_high
    fpr = rate_verdict(
        rejected, tested if can_reject else 0, nominal=alpha, worst=2 * alpha, kind="fpr"
    )
    cov = rate_verdict(covered, intervals, nominal=COVERAGE, worst=COVERAGE - 0.05, kind="coverage")
    return MeasureCalibration(
        measure=name,
        primary=name == "ablation_participation_ratio",
        false_positive=fpr,
        coverage=cov,
        n_per_half=half,
        verdict=_worst(fpr.verdict, cov.verdict),
    )


def split_half_calibration(
    rows,
    *,
    splits: int = 200,
    alpha: float = 0.05,
    n_boot: int = 200,
    n_perm: int = 199,
    seed: int = 0,
) -> CalibrationResult:
    """Random half-vs-half ratio tests of each measure. ``rows``: measure name -> [images x values] of one
    distribution (a bare array is taken as ``mean_entropy_norm``'s)."""
    if not isinstance(rows, dict):
        rows = {"mean_entropy_norm": np.asarray(rows, float)}
    order = sorted(rows, key=lambda m: list(_MEASURES).index(m))  # the primary measure first
    rng = np.random.default_rng(seed)
    measures = tuple(
        _one_measure(
            m,
            np.asarray(rows[m], float),
            splits=splits,
            alpha=alpha,
            n_boot=n_boot,
            n_perm=n_perm,
            rng=rng,
        )
        for m in order
    )
    return CalibrationResult(
        splits=splits,
        alpha=alpha,
        n_images=2 * (len(next(iter(rows.values()))) // 2),
        measures=measures,
        verdict=_worst(*(m.verdict for m in measures)),
    )


def _ablation_rows(
    den, images: np.ndarray, registry, timestep: int, seed: int, progress=None
) -> np.ndarray:
    """[images x heads] single-head mean-ablation degradation (%), as the protocol's primary measure uses."""
    table = ablation_sweep(
        den,
        images,
        targets=targets(registry, "head"),
        methods=("mean",),
        timesteps=[timestep],
        seed=seed,
        dataset="a",
        registry=registry,
        progress=progress,
    )
    return table.pivot_table(index="image", columns="target", values="degradation_pct").to_numpy()


@dataclass(frozen=True, kw_only=True)
class CalibrateConfig(ModelSpec):
    """``diffcircuit calibrate``: the model (``ModelSpec``'s fields) and ``calibrate``'s settings."""

    data: str = "faces"
    n: int = 100
    timestep: int = 500
    splits: int = 200
    seed: int = 0
    ablation: bool = True

    def __post_init__(self):
        super().__post_init__()
        if self.n < 4 or self.splits < 1:
            raise ConfigError("n must be at least 4 and splits at least 1", "n", "splits")

    def settings(self) -> dict:
        """``calibrate``'s keyword arguments besides the model."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in MODEL_FIELDS}


# each CalibrateConfig field in a line: the help of the flag that sets it (``diffcircuit calibrate``)
CALIBRATE_HELP = MODEL_HELP | {
    "data": "one distribution: 'synthetic', 'faces', 'nonfaces' or a folder",
    "n": "images, split into halves (at least 4)",
    "timestep": "the one timestep to calibrate at",
    "splits": "random half-vs-half splits",
    "seed": "noise seed and splits; same seed, same results",
    "ablation": "also check the ablation measures (the primary one)",
}


def calibrate(
    spec: ModelSpec | None = None,
    *,
    data: str = "faces",
    n: int = 100,
    timestep: int = 500,
    splits: int = 200,
    seed: int = 0,
    ablation: bool = True,
    progress: Callable[[int], None] | None = None,
) -> CalibrationResult:
    """Split-half calibration on real model outputs: every head's per-image normalised entropy and effective-keys
    fraction, and (``ablation``) its single-head mean-ablation effect. ``spec``: the model (default: the embedded
    one), with a conditional model's prompt, embeddings or class label. ``progress(k)``: k more images done, of
    ``n`` observed, then (``ablation``) ``n`` ablated."""
    spec = spec or ModelSpec()
    CalibrateConfig(  # the settings are validated as the command's config validates them
        **{name: getattr(spec, name) for name in MODEL_FIELDS},
        data=data,
        n=n,
        timestep=timestep,
        splits=splits,
        seed=seed,
        ablation=ablation,
    )
    setup = build_setup(spec, timesteps=[timestep], images=one_set("a", data, n=n, seed=seed))
    den, registry, images = setup.den, setup.registry, setup.sets["a"]
    with setup.autocast():
        heads, _ = observe(
            den,
            images.images,
            timesteps=[timestep],
            seed=seed,
            registry=registry,
            progress=progress,
        )
    rows = {
        m: heads.pivot_table(index="image", columns=["layer", "head"], values=v).to_numpy()
        for m, v in (
            ("mean_entropy_norm", "entropy_norm"),
            ("mean_effective_keys_frac", "effective_keys_frac"),
        )
    }
    if ablation:
        with setup.autocast():
            effects = _ablation_rows(den, images.images, registry, timestep, seed, progress)
        rows |= {"ablation_participation_ratio": effects, "ablation_heads_for_90pct": effects}
    return split_half_calibration(rows, splits=splits, seed=seed)
