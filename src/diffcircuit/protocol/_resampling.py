"""The resample count the protocol's tests share: ``analyses`` (its denoising and ablation tests, and the
``n_resamples`` it records for the critical family) and ``critical`` (its default) must agree."""

from __future__ import annotations

__all__ = ["N_RESAMPLES"]

N_RESAMPLES = 2000  # permutations (and bootstrap resamples) per test
