"""The matched-pairing permutation test behind content roles (``metrics.roles``).

``scores[u, i, j]`` is unit u's measurement on image i scored against the features of image j (a head's
attention on image i, scored by image j's edge map). Null: the pairing of measurements and features
carries nothing — the head looks where it looks, whatever the image holds (e.g. a fixed position). Then the
matched sum T = Σ_i S[i, i] is distributed as T_π = Σ_i S[i, π(i)] for a uniformly random permutation π
of the images, and p = (1 + #{T_π ≥ T}) / (R + 1) over R random permutations (one-sided: more matched
than chance; never 0, floor 1/(R + 1)). This is exact (a randomisation test) whatever the
distribution of the scores.

Images may be split into blocks, each permuted separately (a stratified test: T and T_π add over
blocks, each block with its own permutations), so the null can be computed block by block and the
blocks' ``permutation_excess`` summed. The per-image **excess** S[i, i] − mean_{j≠i} S[i, j] is how much
better an image's own features fit than the others' do; its mean over images is the effect size.
"""

from __future__ import annotations

import numpy as np

__all__ = ["permutation_excess", "permutation_p"]


def permutation_excess(
    scores: np.ndarray,
    n_permutations: int,
    rng: np.random.Generator,
    *,
    max_elements: int = 1 << 24,
) -> np.ndarray:
    """``[R, units]``: T_π − T for R random permutations π of the images (the same π for every unit).

    ``scores`` ``[units, n, n]``, finite. Units sharing the images share the permutations, which is what a
    joint permutation of the images does (so each unit's own test is exact).
    """
    scores = np.asarray(scores, dtype=np.float64)
    units, n, _ = scores.shape
    observed = np.trace(scores, axis1=1, axis2=2)  # [units]
    perms = np.argsort(
        rng.random((n_permutations, n)), axis=1
    )  # [R, n]: uniform random permutations
    flat = scores.reshape(units, n * n)
    rows = np.arange(n) * n
    step = max(1, max_elements // max(1, units * n))
    out = np.empty((n_permutations, units))
    for lo in range(0, n_permutations, step):
        index = rows + perms[lo : lo + step]  # [r, n]: flat positions of (i, π(i))
        out[lo : lo + step] = flat[:, index].sum(-1).T - observed
    return out


def permutation_p(excess: np.ndarray, scale: np.ndarray | float = 1.0) -> np.ndarray:
    """One-sided p per unit from ``excess`` ``[R, units]`` (T_π − T, summed over blocks): (1 + #{T_π ≥ T})/(R + 1).

    ``scale`` (e.g. Σ|S[i, i]|) sets the tolerance 1e-9·scale under which T_π and T count as tied (a tie
    counts against the claim: identical images give p = 1).
    """
    excess = np.asarray(excess, dtype=np.float64)
    tol = 1e-9 * np.maximum(1.0, np.abs(np.asarray(scale, dtype=np.float64)))
    return (1 + (excess >= -tol).sum(0)) / (excess.shape[0] + 1)
