"""``critical``: every distinct head, layer and block ablation against the distribution of random head
sets of its size (rank among them and a sign-flip test over images), at informative timesteps.

The unit is an image, its degradation averaged over the informative (dataset, timestep) pairs
(``analyses.informative_timesteps``); the null of a layer or block of k heads is the sweep's random
k-head sets, that of a head every other single head (``stats.tests.random_set_tests``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from diffcircuit.protocol._resampling import N_RESAMPLES
from diffcircuit.protocol.roles import pivot_means
from diffcircuit.stats.tests import correct_pvalues, random_set_tests

__all__ = ["CRITICAL_COLUMNS", "critical_table", "informative_rows"]


def informative_rows(
    frame: pd.DataFrame, informative: frozenset[tuple[str, int]] | None
) -> pd.DataFrame:
    """Rows of (dataset, timestep) pairs in ``informative`` (all rows when it is None)."""
    if informative is None:
        return frame
    keep = pd.MultiIndex.from_arrays([frame.dataset, frame.timestep.astype(int)]).isin(
        list(informative)
    )
    return frame[keep]


CRITICAL_COLUMNS = [
    "level",
    "method",
    "target",
    "also_named",
    "n_heads",
    "degradation_pct",
    "null_degradation_pct",
    "null_q95_pct",
    "excess_pct",
    "ci_low",
    "ci_high",
    "frac_sets_beaten",
    "frac_sets_beaten_ci_low",
    "frac_sets_beaten_ci_high",
    "n_null_sets",
    "null",
    "p_sets",
    "p_images",
    "p_value",
    "p_floor",
    "effect_size",
    "n_units",
    "timesteps",
    "p_corrected",
    "q_floor",
    "critical",
]


def _null_members(index: pd.DataFrame) -> tuple[list[int], list[np.ndarray], list[str]]:
    """The tested components' rows of ``index`` (heads, layers, blocks), each one's null members' rows (same
    method: for a head the other heads, else the random sets of its size) and the null's name."""
    level, method, size = index.level.to_numpy(), index.method.to_numpy(), index.n_heads.to_numpy()
    tested, nulls, names = [], [], []
    for i in np.flatnonzero(np.isin(level, ("head", "layer", "block"))):
        same = method == method[i]
        if level[i] == "head":
            members, name = (
                same & (level == "head") & (np.arange(len(level)) != i),
                "other single heads",
            )
        else:
            members, name = (
                same & (level == "random") & (size == size[i]),
                f"random {int(size[i])}-head sets",
            )
        if members.any():
            tested.append(int(i)), nulls.append(np.flatnonzero(members)), names.append(name)
    return tested, nulls, names


def critical_table(
    ablations: pd.DataFrame,
    *,
    seed: int = 0,
    correction: str = "fdr_bh",
    informative: frozenset[tuple[str, int]] | None = None,
    n_resamples: int = N_RESAMPLES,
) -> pd.DataFrame:
    """Each distinct head, layer and block ablation against the *distribution* of random head sets of its size.

    Unit: an image (of either dataset), its degradation averaged over the ``informative`` (dataset, timestep)
    pairs (all when None). Null for a layer or block of k heads: the random k-head sets of the sweep; for a
    head: every other single head (all heads are the random 1-sets). ``stats.random_set_test`` gives the
    rank p of the component among them (set-to-set variation; floor 1/(R + 1)) and a one-sided sign-flip
    p over images of its excess over their mean (image-level uncertainty); p is the larger (both must hold).
    ``frac_sets_beaten``: the fraction of null sets whose mean degradation the component's exceeds.
    Critical = corrected p < 0.05 (one-sided: more harmful), correction within level x method.
    ``q_floor``: the corrected p of a component alone at ``p_floor`` (m·p_floor): below 0.05 a lone
    component can be critical. A head's rank among the other heads makes the head family's p-values at
    least j/m for the j-th smallest, so its corrected p is never below 1: single heads are ranked
    (``frac_sets_beaten``), not called critical, by this null.
    """
    keys = ["level", "target", "n_heads", "method", "also_named"]
    rows = informative_rows(
        ablations[
            [
                c
                for c in (*keys, "dataset", "image", "timestep", "degradation_pct")
                if c in ablations
            ]
        ],
        informative,
    )
    if "also_named" not in rows:
        rows = rows.assign(also_named="")
    per_unit, index, _ = pivot_means(
        rows, keys, ["dataset", "image"], ["degradation_pct"], sort=False
    )
    per_unit = per_unit[
        :, np.isfinite(per_unit).all(0)
    ]  # [components, images measured for every component]
    pairs = rows[["dataset", "timestep"]].drop_duplicates()
    used = ",".join(f"{d}@{t}" for d, t in sorted(zip(pairs.dataset, pairs.timestep.astype(int))))
    tested, nulls, names = _null_members(index)
    found = (
        []
        if per_unit.shape[1] < 2 or not tested
        else random_set_tests(per_unit.T, tested, nulls, n_resamples=n_resamples, seed=seed)
    )
    out = [
        {
            "level": index.level[i],
            "method": index.method[i],
            "target": index.target[i],
            "also_named": index.also_named[i],
            "n_heads": int(index.n_heads[i]),
            "degradation_pct": res.degradation,
            "null_degradation_pct": res.null_mean,
            "null_q95_pct": res.null_q95,
            "excess_pct": res.excess,
            "ci_low": res.ci_low,
            "ci_high": res.ci_high,
            "frac_sets_beaten": res.frac_beaten,
            "frac_sets_beaten_ci_low": res.frac_beaten_ci_low,
            "frac_sets_beaten_ci_high": res.frac_beaten_ci_high,
            "n_null_sets": res.n_null,
            "null": name,
            "p_sets": res.p_sets,
            "p_images": res.p_units,
            "p_value": res.p_value,
            "p_floor": res.p_floor,
            "effect_size": res.effect_size,
            "n_units": res.n_units,
            "timesteps": used,
        }
        for i, name, res in zip(tested, names, found)
    ]
    frame = pd.DataFrame(out, columns=CRITICAL_COLUMNS[:-3])
    frame["p_corrected"], frame["q_floor"] = np.nan, np.nan
    for _, idx in frame.groupby(["level", "method"]).groups.items():
        frame.loc[idx, "p_corrected"] = correct_pvalues(
            frame.loc[idx, "p_value"].to_numpy(), correction
        )
        alone = np.r_[frame.loc[idx, "p_floor"].min(), np.ones(len(idx) - 1)]
        frame.loc[idx, "q_floor"] = correct_pvalues(alone, correction)[0]
    frame["critical"] = frame.p_corrected < 0.05
    return frame
