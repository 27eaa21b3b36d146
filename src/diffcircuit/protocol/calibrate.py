"""``diffcircuit calibrate``: does the statistics framework find differences where there are none?

Observe one image distribution, then split its images at random into two halves many times and
run the same comparison the protocol runs between distributions — the ratio of mean normalised
attention entropy, with its bootstrap CI and permutation p-value (``stats.complexity.ratio_test``).
Both halves come from one distribution, so the true ratio is 1: the false-positive rate at
α = 0.05 should be ≈ 0.05 and the 95 % CI should cover 1 in ≈ 95 % of splits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from diffcircuit.instrument.session import probe_registry
from diffcircuit.metrics.observe import observe
from diffcircuit.models.latent import model_images
from diffcircuit.models.loading import load_conditioned, use_captions
from diffcircuit.stats.complexity import mean_value, ratio_test

__all__ = ["CalibrationResult", "calibrate", "split_half_calibration"]


@dataclass(frozen=True, kw_only=True)
class CalibrationResult:
    splits: int
    alpha: float
    false_positive_rate: float
    coverage: float
    n_images: int


def split_half_calibration(rows: np.ndarray, *, splits: int = 200, alpha: float = 0.05, n_boot: int = 200,
                           n_perm: int = 199, seed: int = 0) -> CalibrationResult:
    """Random half-vs-half ratio tests on ``rows`` (images x values) from one distribution."""
    rng = np.random.default_rng(seed)
    rejected = covered = 0
    half = len(rows) // 2
    for k in range(splits):
        perm = rng.permutation(len(rows))
        res = ratio_test(rows[perm[:half]], rows[perm[half: 2 * half]], mean_value, n_boot=n_boot, n_perm=n_perm,
                         seed=int(rng.integers(2**31)))
        rejected += res.p_value < alpha
        covered += res.ci_low <= 1.0 <= res.ci_high
    return CalibrationResult(splits=splits, alpha=alpha, false_positive_rate=rejected / splits, coverage=covered / splits,
                             n_images=2 * half)


def calibrate(*, model: str = "embedded", data: str = "faces", n: int = 100, timestep: int = 500, splits: int = 200,
              seed: int = 0, allow_pickle: bool = False, **conditioning) -> CalibrationResult:
    """Split-half calibration on real model outputs (per-image normalised entropy of every head). ``conditioning``:
    ``prompt``, ``prompt_embeds`` or ``class_label`` of a conditional model, as in ``load_conditioned``."""
    den = load_conditioned(model, allow_pickle=allow_pickle, **conditioning)
    den.check_timesteps([timestep])
    images = model_images(den, data, n=n, seed=seed)
    use_captions(den, "a", images.captions, allow_pickle=allow_pickle, spec=data)
    registry = probe_registry(den.network, torch.from_numpy(images.images[:1]), torch.zeros(1, dtype=torch.long))
    heads, _ = observe(den, images.images, timesteps=[timestep], seed=seed, registry=registry)
    rows = heads.pivot_table(index="image", columns=["layer", "head"], values="entropy_norm").to_numpy()
    return split_half_calibration(rows, splits=splits, seed=seed)
