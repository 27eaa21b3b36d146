"""Functional head roles per dataset and timestep: content roles tested against a null, geometric roles by rule.

A **content role** says a head prefers keys with some property of *the image it is looking at*. Its raw score
(an affinity, "attended / uniform") cannot say that alone: a head that always looks at the centre has a
high texture affinity on any set whose objects sit in the centre. So each content probe is tested against
the same head's attention scored on *other* images' features (``protocol.roles``: the per-image log score
S[i, i] against mean_{j≠i} S[i, j], a matched-pairing permutation test over images, Benjamini–Hochberg over
heads). A content role needs a significant positive excess (q < ``RoleRules.q``) of at least
``RoleRules.min_excess`` (log units; log 1.1 ≈ 10 % above the null):

- ``semantic``: the object probe (attention mass on the query's own region, object or background, by the
  ground-truth mask) at distance_frac ≥ 0.15 — groups its region's keys beyond its neighbourhood;
- ``edge``: high-gradient keys; ``texture``: keys of high local high-frequency energy;
- ``intensity``: keys of similar brightness to the query; ``background``: background keys.

When several qualify: edge and texture are two energy maps of the same luminance that peak on nearly the
same keys, so between them the map whose attended keys rank higher within their image wins
(``edge_percentile`` vs ``texture_percentile``: a head on the image's highest-gradient keys is at the top of
the edge ranking, not quite of the texture one); among the rest, the largest effect size d_z (mean / SD of
the per-image excess: the preference the head keeps image after image). ``also`` names the other probes that
qualify; where it is not empty the images may not fully tell those probes apart. Object and background need
masks (synthetic images only).

**Geometric roles** describe where a head looks (mean scores over the dataset's images):

- ``local``: distance_frac ≤ 0.12; ``focal``: effective_keys_frac ≤ 0.1 (a few distant keys take the mass);
- ``global``: effective_keys_frac ≥ 0.8 (near-uniform attention, ``entropy_norm`` ≈ 1).

A head with no content role and no geometric role whose raw mean affinity passes the raw thresholds of
``RoleRules`` (e.g. texture affinity ≥ 1.25) is **positional** when, for every such probe, the excess over
its null is bounded below ``min_excess`` (the upper end of its 95 % bootstrap interval under log 1.1): its
content score is explained by where it looks, not by what it sees. A test that merely fails to reject is not
that evidence: such a head is ``unassigned`` with the probe named as inconclusive. ``raw_only`` lists, for
every head, the probes whose raw score passes while the null test does not give a content role. Otherwise
``unassigned`` (its ``role_basis`` names a raw score that passes where no null was run: that head is neither
content nor positional, its label is withheld). ``role_basis`` says which kind of evidence gave the role.
Attention weights are not importance: roles say where a head looks; interventions say whether it matters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from diffcircuit.metrics.attention import CONTENT_PROBES

__all__ = ["CONTENT_ROLES", "ROLES", "ROLE_DEFINITIONS", "RoleRules", "assign_roles", "head_scores"]

CONTENT_ROLES = ("semantic", "edge", "texture", "intensity", "background")
ROLES = (*CONTENT_ROLES, "local", "focal", "global")
_PROBE_OF = {
    "semantic": "object",
    "edge": "edge",
    "texture": "texture",
    "intensity": "intensity",
    "background": "background",
}
_RAW_OF = {
    "object": "object_affinity",
    "edge": "edge_affinity",
    "texture": "texture_affinity",
    "intensity": "intensity_affinity",
    "background": "background_affinity",
}
ROLE_DEFINITIONS = {
    "semantic": "object probe's excess over its null significant (q < 0.05) and >= log 1.1; distance_frac >= 0.15",
    "edge": "edge probe's excess over its null significant (q < 0.05) and >= log 1.1",
    "texture": "texture probe's excess over its null significant (q < 0.05) and >= log 1.1",
    "intensity": "intensity probe's excess over its null significant (q < 0.05) and >= log 1.1",
    "background": "background probe's excess over its null significant (q < 0.05) and >= log 1.1",
    "local": "no content role; distance_frac <= 0.12",
    "focal": "no content role; effective_keys_frac <= 0.1",
    "global": "no content role; effective_keys_frac >= 0.8 (near-uniform attention)",
    "positional": "no content or geometric role; a raw affinity passes its raw threshold and its excess over "
    "the null is below log 1.1 with 95 % confidence (interval's upper end)",
    "unassigned": "no rule holds",
}  # with the default RoleRules
SCORE_COLUMNS = (
    "entropy_nats",
    "entropy_norm",
    "effective_keys_frac",
    "distance_frac",
    "edge_affinity",
    "texture_affinity",
    "object_affinity",
    "background_affinity",
    "intensity_affinity",
    "edge_percentile",
    "texture_percentile",
)


@dataclass(frozen=True, kw_only=True)
class RoleRules:
    q: float = 0.05  # a content role's corrected p must be below this
    min_excess: float = math.log(1.1)  # ... and its excess over the null at least this (log units)
    semantic_distance: float = 0.15
    local_distance: float = 0.12
    focal_keys: float = 0.1
    global_keys: float = 0.8
    # raw thresholds: only to say that a head *would* have scored as content without the null (positional)
    raw_object: float = 1.15
    raw_edge: float = 1.25
    raw_texture: float = 1.25
    raw_intensity: float = 1.5
    raw_background: float = 1.2


def head_scores(heads: pd.DataFrame) -> pd.DataFrame:
    """Mean of each raw score per dataset x timestep x layer x head, over that dataset's images."""
    keys = ["dataset", "timestep", "layer", "head"]
    return heads.groupby(keys, sort=False)[list(SCORE_COLUMNS)].mean().reset_index()


def _get(row, name: str) -> float:
    value = getattr(row, name, math.nan)
    return math.nan if value is None else float(value)


def _content_candidates(row, rules: RoleRules) -> dict[str, float]:
    """Content roles whose probe beats its null, with the effect size d_z that ranks them."""
    candidates = {}
    for role, probe in _PROBE_OF.items():
        q, excess = _get(row, f"{probe}_q"), _get(row, f"{probe}_excess")
        if not (q < rules.q and excess >= rules.min_excess):
            continue  # NaN (no test) fails too: a label is withheld when its test cannot be run
        if role == "semantic" and not row.distance_frac >= rules.semantic_distance:
            continue
        dz = _get(row, f"{probe}_dz")
        candidates[role] = dz if dz == dz else 0.0
    return candidates


def _raw_only(row, rules: RoleRules) -> tuple[list[str], list[str], list[str]]:
    """Probes whose raw mean affinity passes its raw threshold while the null test does not give a content role
    (``failed``); of those, the ones whose excess over the null is bounded below ``min_excess`` by its 95 %
    interval (``explained``: where the head looks accounts for its raw score); and those whose raw affinity
    passes but whose null could not be run (``untested``: q is NaN, no verdict either way)."""
    failed, explained, untested = [], [], []
    for probe, column in _RAW_OF.items():
        raw = _get(row, column)
        if not raw >= getattr(rules, f"raw_{probe}"):
            continue
        q, excess = _get(row, f"{probe}_q"), _get(row, f"{probe}_excess")
        if q != q:
            untested.append(probe)
        elif not (q < rules.q and excess >= rules.min_excess):
            failed.append(probe)
            if (
                _get(row, f"{probe}_excess_ci_high") < rules.min_excess
            ):  # NaN (no interval): not bounded
                explained.append(probe)
    return failed, explained, untested


def _geometric_role(row, rules: RoleRules) -> str | None:
    if row.distance_frac <= rules.local_distance:
        return "local"
    if row.effective_keys_frac <= rules.focal_keys:
        return "focal"
    if row.effective_keys_frac >= rules.global_keys:
        return "global"
    return None


def _role(row, rules: RoleRules) -> tuple[str, str, str, str]:
    failed, explained, untested = _raw_only(row, rules)
    raw_only = ",".join(failed)
    candidates = _content_candidates(row, rules)
    if {"edge", "texture"} <= set(
        candidates
    ):  # the two energy maps: the one the head selects on higher
        loser = (
            "texture" if _get(row, "edge_percentile") >= _get(row, "texture_percentile") else "edge"
        )
        candidates[loser] = -math.inf
    if candidates:
        ranked = sorted(candidates, key=lambda r: (-candidates[r], r))
        return ranked[0], "content: excess over the null", ",".join(ranked[1:]), raw_only
    geometric = _geometric_role(row, rules)
    if geometric is not None:
        return geometric, "geometry", "", raw_only
    if failed and explained == failed:
        return (
            "positional",
            "raw content score explained by its null (excess bounded below)",
            "",
            raw_only,
        )
    if failed:  # not significant is not "explained": the excess may still be large
        inconclusive = ",".join(p for p in failed if p not in explained)
        return (
            "unassigned",
            f"raw {inconclusive} score passes; its null test is inconclusive (withheld)",
            "",
            raw_only,
        )
    if (
        untested
    ):  # a raw score passes but nothing tested it: neither a content role nor "positional"
        return (
            "unassigned",
            f"raw {','.join(untested)} score passes; its null was not run (withheld)",
            "",
            raw_only,
        )
    return "unassigned", "none", "", raw_only


def assign_roles(scores: pd.DataFrame, rules: RoleRules = RoleRules()) -> pd.DataFrame:
    """``scores`` (``head_scores`` joined with per-probe ``<probe>_excess``/``_dz``/``_q`` columns; missing
    columns mean no test) with ``role``, ``role_basis``, ``also`` and ``raw_only`` added."""
    scores = scores.copy()
    for probe in CONTENT_PROBES:
        for suffix in ("excess", "excess_ci_low", "excess_ci_high", "dz", "p", "q"):
            if f"{probe}_{suffix}" not in scores:
                scores[f"{probe}_{suffix}"] = np.nan
    decided = [_role(row, rules) for row in scores.itertuples()]
    where = list(scores.columns).index("head") + 1
    for offset, name in enumerate(("role", "role_basis", "also", "raw_only")):
        scores.insert(where + offset, name, [d[offset] for d in decided])
    return scores
