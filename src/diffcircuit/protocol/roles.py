"""The role null in the protocol: blocks, permutation sums per shard, role tests and roles per dataset.

Within each block of a dataset's images (``null_blocks``: ``role_null_block`` consecutive images), every
head's attention on image i is scored against the content features of every image j of the block (S[i, j],
``metrics.observe.observe_with_null``). Per dataset x timestep x head x content probe:

- ``mean_log``: the mean over images of S[i, i], the log content score (log of the affinity);
- ``excess``: the mean over images of S[i, i] − mean_{j≠i} S[i, j] — how much better the head's attention
  fits its own image's features than other images' (log units: 0.1 ≈ 10 % more), with a percentile
  bootstrap CI over images (``ci_low``/``ci_high``, ``ci_resamples``; withheld, NaN, below 5 images), and ``effect_size``: Cohen's d_z of the
  per-image excess (mean / SD: how consistently the head prefers its own image's features);
- ``p_value``: the matched-pairing permutation test (``stats.matching``), one-sided, R permutations of the
  images within each block (floor 1/(R + 1)); ``q_value``: Benjamini–Hochberg (or Holm) over the heads of
  one dataset x timestep x probe.

A head whose attention sits at fixed positions scores the same against any image's features: its excess is
0 and its p uniform, however large its raw affinity (e.g. a head that looks at the centre, where synthetic
objects are). ``metrics.roles.assign_roles`` turns these tests into roles.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from diffcircuit.metrics.attention import CONTENT_PROBES
from diffcircuit.metrics.observe import BlockScores
from diffcircuit.metrics.roles import RoleRules, assign_roles, head_scores
from diffcircuit.stats.bootstrap import MIN_UNITS_FOR_CI, column_mean_cis
from diffcircuit.stats.matching import permutation_excess, permutation_p
from diffcircuit.stats.tests import correct_pvalues

__all__ = [
    "coded",
    "frame_groups",
    "head_roles_table",
    "null_blocks",
    "permutation_table",
    "pivot_means",
    "role_tests_table",
    "shard_slices",
]

_CI_RESAMPLES = 2000


def frame_groups(frame: pd.DataFrame, keys: list[str], columns: list[str] | None = None):
    """(key tuple, rows) of each group of ``frame`` by ``keys``, sorted; only ``columns`` (all when None) are
    copied into the groups, without pandas' per-group overhead."""
    groups = {
        k if isinstance(k, tuple) else (k,): rows
        for k, rows in frame.groupby(keys, sort=False).indices.items()
    }
    narrow = coded(
        frame if columns is None else frame[list(dict.fromkeys([*keys, *columns]))], exclude=keys
    )
    for key in sorted(groups):
        yield key, narrow.take(groups[key])


def coded(frame: pd.DataFrame, exclude=()) -> pd.DataFrame:
    """``frame`` with its text columns (but ``exclude``) as categories: labels hashed once for many pivots."""
    text = [
        c
        for c in frame
        if c not in exclude and (frame[c].dtype == object or pd.api.types.is_string_dtype(frame[c]))
    ]
    return frame.astype({c: "category" for c in text}) if text else frame


def _keys(
    frame: pd.DataFrame, keys: list[str], sort: bool = True
) -> tuple[np.ndarray, pd.DataFrame]:
    """Each row's code among the distinct values of ``keys`` present (sorted as pandas sorts them, or in order of
    first appearance) and those values."""
    codes, uniques = zip(*(pd.factorize(frame[k], sort=sort) for k in keys))
    if len(frame) == 0:
        return np.zeros(0, np.int64), pd.DataFrame(
            {k: np.asarray(u) for k, u in zip(keys, uniques)}
        )
    flat = np.ravel_multi_index(codes, [len(u) for u in uniques]) if len(keys) > 1 else codes[0]
    inverse, present = pd.factorize(flat, sort=sort)
    parts = np.unravel_index(present, [len(u) for u in uniques])
    return inverse, pd.DataFrame(
        {k: np.asarray(u)[part] for k, u, part in zip(keys, uniques, parts)}
    )


def pivot_means(
    frame: pd.DataFrame,
    index: list[str],
    columns: list[str],
    values: list[str],
    *,
    sort: bool = True,
):
    """``frame.pivot_table(index, columns, values, aggfunc="mean")`` for the (column keys) present, as arrays:
    ``(means [n_index, len(values) · n_columns] with the values sorted and outermost, index keys, column keys)``,
    keys sorted (or, ``sort=False``, in order of first appearance; keys must not be missing). A cell without
    finite values is NaN (pandas' mean skips NaN); the grouped sums are ``np.bincount``'s."""
    rows, row_keys = _keys(frame, index, sort)
    cols, col_keys = _keys(frame, columns, sort)
    cell = rows * len(col_keys) + cols
    size = len(row_keys) * len(col_keys)
    out = np.empty((len(row_keys), len(values), len(col_keys)))
    for j, value in enumerate(sorted(values)):
        x = frame[value].to_numpy(np.float64)
        ok = np.isfinite(x)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[:, j] = (
                np.bincount(cell[ok], x[ok], size) / np.bincount(cell[ok], minlength=size)
            ).reshape(out[:, j].shape)
    return out.reshape(len(row_keys), len(values) * len(col_keys)), row_keys, col_keys


def null_blocks(n: int, block: int) -> list[tuple[int, int]]:
    """Consecutive blocks of ``block`` images covering ``range(n)``; a remainder under half a block joins the last."""
    edges = list(range(0, n, block)) + [n]
    if len(edges) > 2 and edges[-1] - edges[-2] < block / 2:
        del edges[-2]
    return list(zip(edges[:-1], edges[1:]))


def shard_slices(n: int, step: int, block: int) -> list[tuple[int, int]]:
    """Observation shards of whole null blocks, each of at least ``step`` images (the last may be smaller)."""
    out, lo = [], 0
    for _, b_hi in null_blocks(n, block):
        if b_hi - lo >= step or b_hi == n:
            out.append((lo, b_hi))
            lo = b_hi
    return out


def _label(dataset: str) -> int:
    import hashlib

    return int.from_bytes(hashlib.sha256(dataset.encode()).digest()[:8], "little")


def permutation_table(
    blocks: list[BlockScores], *, seed: int, dataset: str, n_permutations: int
) -> pd.DataFrame:
    """One row per timestep x layer x head x probe: ``observed`` T = Σ S[i, i], ``scale`` Σ |S[i, i]|, ``n_images``
    and ``excess`` (T_π − T for each of R permutations, float32), summed over the given blocks. Each block's
    permutations are drawn from ``(seed, dataset, timestep, block start, layer, probe)``, so the sums do not
    depend on how blocks are grouped into shards."""
    total: dict[tuple, list] = {}
    for b in blocks:
        rng = np.random.default_rng(
            [
                seed,
                _label(dataset),
                b.timestep,
                b.block_start,
                _label(b.layer),
                CONTENT_PROBES.index(b.probe),
            ]
        )
        perm = permutation_excess(b.scores, n_permutations, rng)  # [R, heads]
        diag = np.diagonal(b.scores, axis1=1, axis2=2)  # [heads, n]
        parts = [diag.sum(1), np.abs(diag).sum(1), np.full(len(diag), diag.shape[1]), perm]
        key = (b.timestep, b.layer, b.probe)
        total[key] = parts if key not in total else [x + y for x, y in zip(total[key], parts)]
    return pd.DataFrame(
        [
            {
                "timestep": int(t),
                "layer": layer,
                "head": h,
                "probe": probe,
                "observed": float(obs[h]),
                "scale": float(scale[h]),
                "n_images": int(n[h]),
                "n_permutations": n_permutations,
                "excess": perm[:, h].astype(np.float32),
            }
            for (t, layer, probe), (obs, scale, n, perm) in total.items()
            for h in range(len(obs))
        ],
        columns=[
            "timestep",
            "layer",
            "head",
            "probe",
            "observed",
            "scale",
            "n_images",
            "n_permutations",
            "excess",
        ],
    )


def _pvalues(perms: pd.DataFrame) -> pd.DataFrame:
    """Shards' permutation rows (one dataset) summed per unit, and the one-sided p of each."""
    keys = ["timestep", "layer", "head", "probe"]
    code, units = _keys(perms, keys, sort=False)
    order = np.argsort(code, kind="stable")
    starts = np.flatnonzero(
        np.r_[True, np.diff(code[order]) != 0]
    )  # each unit's first row in ``order``
    excess, scale = list(perms.excess), perms.scale.to_numpy(np.float64)
    p = np.empty(len(units))
    for lo, hi in zip(starts, np.r_[starts[1:], len(order)]):
        rows = order[
            lo:hi
        ]  # the unit's shards: their excesses add (the blocks are permuted independently)
        total = np.sum([excess[r] for r in rows], axis=0, dtype=np.float64)
        p[code[order[lo]]] = permutation_p(total[:, None], scale[rows].sum())[0]
    sums = perms.groupby(code).agg(
        n_null_images=("n_images", "sum"), n_permutations=("n_permutations", "first")
    )
    return units.assign(
        p_value=p,
        n_null_images=sums.n_null_images.to_numpy().astype(int),
        n_permutations=sums.n_permutations.to_numpy().astype(int),
    )


def role_tests_table(
    heads: pd.DataFrame,
    permutations: dict[str, pd.DataFrame],
    *,
    seed: int = 0,
    correction: str = "fdr_bh",
) -> pd.DataFrame:
    """Per dataset x timestep x head x probe: ``mean_log``, ``excess`` with CI, ``p_value``, ``q_value`` (module
    docstring). ``permutations``: per dataset, the shards' ``permutation_table`` rows concatenated."""
    pvals = {dataset: _pvalues(perms) for dataset, perms in permutations.items() if not perms.empty}
    if not pvals:
        return pd.DataFrame()
    columns = [
        "image",
        "layer",
        "head",
        *(f"{p}_{kind}" for p in CONTENT_PROBES for kind in ("log", "excess")),
    ]
    frames = [
        _effects(g, int(t), seed)
        .merge(pvals[dataset], on=["timestep", "layer", "head", "probe"], how="left")
        .assign(dataset=dataset)
        for (dataset, t), g in frame_groups(heads, ["dataset", "timestep"], columns)
        if dataset in pvals
    ]
    if not frames:
        return pd.DataFrame()
    out = pd.concat(frames, ignore_index=True)
    out["q_value"] = np.nan
    for _, idx in out.groupby(["dataset", "timestep", "probe"]).groups.items():
        p = out.loc[idx, "p_value"]
        ok = p.notna()
        out.loc[p[ok].index, "q_value"] = correct_pvalues(p[ok].to_numpy(), correction)
    order = [
        "dataset",
        "timestep",
        "layer",
        "head",
        "probe",
        "mean_log",
        "excess",
        "ci_low",
        "ci_high",
        "ci_resamples",
        "effect_size",
        "n_images",
        "p_value",
        "q_value",
        "n_null_images",
        "n_permutations",
    ]
    return out[order]


def _effects(g: pd.DataFrame, t: int, seed: int) -> pd.DataFrame:
    """Mean log score and mean excess per head and probe over one timestep's images, the excess with the
    percentile interval of its bootstrap resamples (every head and probe on the same resamples) and d_z."""
    excess, _, cols = pivot_means(
        g, ["image"], ["layer", "head"], [f"{p}_excess" for p in CONTENT_PROBES]
    )
    logs, _, _ = pivot_means(g, ["image"], ["layer", "head"], [f"{p}_log" for p in CONTENT_PROBES])
    probes = np.repeat(sorted(CONTENT_PROBES), len(cols))  # pivot_means: values sorted, outermost
    mean, low, high = column_mean_cis(excess, n_resamples=_CI_RESAMPLES, seed=seed)
    n_images = np.isfinite(excess).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: probes without masks
        sd = np.nanstd(excess, axis=0, ddof=1)
        mean_log = np.nanmean(logs, axis=0)
    few = (
        n_images < MIN_UNITS_FOR_CI
    )  # a percentile interval over so few images is not a 95 % interval
    out = pd.concat([cols] * len(CONTENT_PROBES), ignore_index=True).assign(
        timestep=t,
        probe=probes,
        mean_log=mean_log,
        excess=mean,
        ci_low=np.where(few, np.nan, low),
        ci_high=np.where(few, np.nan, high),
        ci_resamples=_CI_RESAMPLES,
        effect_size=np.where(sd > 0, mean / sd, np.nan),
        n_images=n_images,
    )  # effect size: Cohen's d_z of the excess
    return out[
        [
            "timestep",
            "layer",
            "head",
            "probe",
            "mean_log",
            "excess",
            "ci_low",
            "ci_high",
            "ci_resamples",
            "effect_size",
            "n_images",
        ]
    ]


def head_roles_table(
    heads: pd.DataFrame, tests: pd.DataFrame, rules: RoleRules | None = None
) -> pd.DataFrame:
    """One row per dataset x timestep x head: mean raw scores, per probe ``<probe>_excess`` (with CI),
    ``<probe>_p``, ``<probe>_q``, and the head's ``role`` with its ``role_basis`` (``metrics.roles``)."""
    scores = head_scores(heads)
    if tests is not None and len(tests):
        wide = tests.pivot_table(
            index=["dataset", "timestep", "layer", "head"],
            columns="probe",
            values=["excess", "ci_low", "ci_high", "effect_size", "p_value", "q_value"],
            dropna=False,
        )
        names = {
            "excess": "excess",
            "ci_low": "excess_ci_low",
            "ci_high": "excess_ci_high",
            "effect_size": "dz",
            "p_value": "p",
            "q_value": "q",
        }
        wide.columns = [f"{probe}_{names[kind]}" for kind, probe in wide.columns]
        scores = scores.merge(
            wide.reset_index(), on=["dataset", "timestep", "layer", "head"], how="left"
        )
    return assign_roles(scores, rules or RoleRules())
