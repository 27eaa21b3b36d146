"""Eight functional head roles, each a documented rule on measured probe scores.

A head's scores at a timestep are its metrics averaged over every image of both datasets (object
and background probes over the images that have masks, i.e. synthetic ones). Affinities are
"attended / uniform" (1 = no preference; see ``metrics.attention``). Rules, with the defaults of
``RoleRules``:

content roles — the head prefers keys with some property of the clean image:
- ``semantic``: object_affinity ≥ 1.15 and distance_frac ≥ 0.15 — groups keys of the query's own
  object or background region beyond its neighbourhood (object-level);
- ``edge``: edge_affinity ≥ 1.25 — attends to high-gradient keys;
- ``texture``: texture_affinity ≥ 1.25 — attends to keys with high local high-frequency energy;
- ``intensity``: intensity_affinity ≥ 1.5 — attends to keys of similar brightness;
- ``background``: background_affinity ≥ 1.2 — attends to background keys more than their share;

geometric roles — no content preference met; the head is defined by where it looks:
- ``local``: distance_frac ≤ 0.12 — attends near the query (local smoothing);
- ``focal``: effective_keys_frac ≤ 0.1 and distance_frac > 0.12 — a few distant keys take most
  of the mass (sink-like / positional);
- ``global``: effective_keys_frac ≥ 0.8 — spreads attention over most of the map (global context;
  note: near-uniform attention, ``entropy_norm`` ≈ 1);

otherwise ``unassigned``. When several content rules hold, the one whose score exceeds its
threshold by the largest relative margin, (score − 1) / (threshold − 1), wins.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

__all__ = ["ROLES", "ROLE_DEFINITIONS", "RoleRules", "assign_roles", "head_scores"]

ROLES = ("semantic", "edge", "texture", "intensity", "background", "local", "focal", "global")
ROLE_DEFINITIONS = {
    "semantic": "object_affinity >= 1.15 and distance_frac >= 0.15",
    "edge": "edge_affinity >= 1.25",
    "texture": "texture_affinity >= 1.25",
    "intensity": "intensity_affinity >= 1.5",
    "background": "background_affinity >= 1.2",
    "local": "no content rule; distance_frac <= 0.12",
    "focal": "no content rule; effective_keys_frac <= 0.1",
    "global": "no content rule; effective_keys_frac >= 0.8 (near-uniform attention)",
    "unassigned": "no rule holds",
}  # with the default RoleRules
SCORE_COLUMNS = ("entropy_nats", "entropy_norm", "effective_keys_frac", "distance_frac", "edge_affinity",
                 "texture_affinity", "object_affinity", "background_affinity", "intensity_affinity")


@dataclass(frozen=True, kw_only=True)
class RoleRules:
    semantic_object: float = 1.15
    semantic_distance: float = 0.15
    edge: float = 1.25
    texture: float = 1.25
    intensity: float = 1.5
    background: float = 1.2
    local_distance: float = 0.12
    focal_keys: float = 0.1
    global_keys: float = 0.8


def head_scores(heads: pd.DataFrame) -> pd.DataFrame:
    """Mean of each score per timestep x layer x head, over all images of both datasets."""
    return heads.groupby(["timestep", "layer", "head"], sort=False)[list(SCORE_COLUMNS)].mean().reset_index()


def _content_role(row, rules: RoleRules) -> str | None:
    candidates = {
        "semantic": (row.object_affinity, rules.semantic_object) if row.distance_frac >= rules.semantic_distance else None,
        "edge": (row.edge_affinity, rules.edge),
        "texture": (row.texture_affinity, rules.texture),
        "intensity": (row.intensity_affinity, rules.intensity),
        "background": (row.background_affinity, rules.background),
    }
    margins = {role: (score - 1) / (threshold - 1) for role, c in candidates.items() if c is not None
               for score, threshold in [c] if np.isfinite(score) and score >= threshold}
    return max(margins, key=margins.get) if margins else None


def _geometric_role(row, rules: RoleRules) -> str | None:
    if row.distance_frac <= rules.local_distance:
        return "local"
    if row.effective_keys_frac <= rules.focal_keys:
        return "focal"
    if row.effective_keys_frac >= rules.global_keys:
        return "global"
    return None


def assign_roles(heads: pd.DataFrame, rules: RoleRules = RoleRules()) -> pd.DataFrame:
    """One row per timestep x layer x head: its scores and its ``role``."""
    scores = head_scores(heads)
    roles = [_content_role(row, rules) or _geometric_role(row, rules) or "unassigned" for row in scores.itertuples()]
    scores.insert(3, "role", roles)
    return scores
