from __future__ import annotations

import pandas as pd

from diffcircuit.metrics.roles import ROLES, assign_roles

NEUTRAL = dict(entropy_nats=3.0, entropy_norm=0.7, effective_keys_frac=0.4, distance_frac=0.3, edge_affinity=1.0,
               texture_affinity=1.0, object_affinity=1.0, background_affinity=1.0, intensity_affinity=1.0)


def _frame(rows):
    out = []
    for head, overrides in enumerate(rows):
        for image, dataset in ((0, "a"), (1, "b")):
            out.append({"dataset": dataset, "image": image, "timestep": 500, "layer": "L", "head": head,
                        **NEUTRAL, **overrides})
    return pd.DataFrame(out)


def test_each_rule_picks_its_role_and_nothing_is_forced():
    cases = {
        "semantic": dict(object_affinity=1.4, distance_frac=0.3),
        "edge": dict(edge_affinity=1.6),
        "texture": dict(texture_affinity=1.5),
        "intensity": dict(intensity_affinity=2.0),
        "background": dict(background_affinity=1.3),
        "local": dict(distance_frac=0.05),
        "focal": dict(effective_keys_frac=0.05),
        "global": dict(effective_keys_frac=0.95),
        "unassigned": {},
    }
    roles = assign_roles(_frame(list(cases.values())))
    assert list(roles.role) == list(cases)
    assert set(ROLES) < set(roles.role)


def test_largest_relative_margin_wins_and_semantic_needs_reach():
    roles = assign_roles(_frame([dict(edge_affinity=1.3, texture_affinity=1.9),  # texture margin 3.6 > edge 1.2
                                 dict(object_affinity=2.0, distance_frac=0.05)]))  # too local for semantic
    assert list(roles.role) == ["texture", "local"]


def test_scores_average_over_images_of_both_datasets():
    frame = _frame([{}])
    frame.loc[frame.dataset == "a", "edge_affinity"] = 1.0
    frame.loc[frame.dataset == "b", "edge_affinity"] = 2.0  # mean 1.5 >= 1.25
    assert assign_roles(frame).role.tolist() == ["edge"]
