"""Role rules on given scores and tests: content needs its null, geometry and positional labels otherwise."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from diffcircuit.metrics.roles import ROLES, assign_roles, head_scores

NEUTRAL = dict(
    entropy_nats=3.0,
    entropy_norm=0.7,
    effective_keys_frac=0.4,
    distance_frac=0.3,
    edge_affinity=1.0,
    texture_affinity=1.0,
    object_affinity=1.0,
    background_affinity=1.0,
    intensity_affinity=1.0,
    edge_percentile=0.5,
    texture_percentile=0.5,
)
SIGNIFICANT = dict(excess=0.5, q=0.001, dz=2.0)


def _test(probe: str, **values) -> dict:
    return {f"{probe}_{k}": v for k, v in (SIGNIFICANT | values).items()}


def _frame(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {"dataset": "a", "timestep": 500, "layer": "L", "head": h, **NEUTRAL, **r}
            for h, r in enumerate(rows)
        ]
    )


def test_each_rule_picks_its_role_and_nothing_is_forced():
    cases = {
        "semantic": _test("object"),
        "edge": _test("edge"),
        "texture": _test("texture"),
        "intensity": _test("intensity"),
        "background": _test("background"),
        "local": dict(distance_frac=0.05),
        "focal": dict(effective_keys_frac=0.05),
        "global": dict(effective_keys_frac=0.95),
        "positional": dict(
            texture_affinity=1.9, **_test("texture", q=0.4, excess=0.01, excess_ci_high=0.05)
        ),
        "unassigned": {},
    }
    roles = assign_roles(_frame(list(cases.values())))
    assert list(roles.role) == list(cases)
    assert set(ROLES) < set(roles.role)


def test_a_content_role_needs_a_significant_and_large_enough_excess():
    roles = assign_roles(
        _frame(
            [
                _test("edge", q=0.06),
                _test("edge", excess=math.log(1.05)),
                _test("edge", q=math.nan),
                dict(edge_affinity=3.0, **_test("edge", q=0.4, excess=0.02, excess_ci_high=0.09)),
            ]
        )
    )
    assert list(roles.role) == ["unassigned"] * 3 + ["positional"]  # 0.09 < log 1.1 = 0.0953
    assert roles.raw_only.iloc[3] == "edge"


def test_a_test_that_fails_to_reject_is_not_evidence_of_a_positional_head():
    """Not significant (q = 0.06) with a large excess (0.40: about 49 % above the null) or with no interval: the
    null test is inconclusive, so the head gets no label, neither content nor positional."""
    roles = assign_roles(
        _frame(
            [
                dict(
                    texture_affinity=1.6,
                    **_test("texture", q=0.06, excess=0.40, excess_ci_high=0.8),
                ),
                dict(texture_affinity=1.6, **_test("texture", q=0.3, excess=0.01)),  # no interval
                dict(
                    texture_affinity=1.6, **_test("texture", q=0.3, excess=0.05, excess_ci_high=0.1)
                ),
            ]
        )
    )
    assert (
        list(roles.role) == ["unassigned"] * 3
    )  # 0.1 >= log 1.1: not bounded below the margin either
    assert all("texture" in b and "inconclusive" in b for b in roles.role_basis)
    assert list(roles.raw_only) == ["texture"] * 3


def test_a_raw_score_nothing_tested_is_neither_content_nor_positional():
    roles = assign_roles(
        _frame([dict(edge_affinity=3.0), dict(edge_affinity=3.0, **_test("edge", q=math.nan))])
    )
    assert list(roles.role) == ["unassigned", "unassigned"]
    assert list(roles.raw_only) == ["", ""]
    assert all("edge" in b and "not run" in b for b in roles.role_basis)


def test_a_raw_score_its_null_explains_keeps_a_geometric_role_and_says_so():
    roles = assign_roles(
        _frame([dict(distance_frac=0.05, texture_affinity=1.6, **_test("texture", q=0.3))])
    )
    assert roles.role.item() == "local" and roles.raw_only.item() == "texture"


def test_the_most_consistent_probe_wins_and_the_others_are_named():
    roles = assign_roles(_frame([{**_test("intensity", dz=1.0), **_test("background", dz=3.0)}]))
    assert roles.role.item() == "background" and roles.also.item() == "intensity"


def test_edge_and_texture_are_told_apart_by_the_keys_they_select():
    both = {**_test("edge", dz=1.0), **_test("texture", dz=3.0)}
    roles = assign_roles(
        _frame(
            [
                both | dict(edge_percentile=0.97, texture_percentile=0.9),
                both | dict(edge_percentile=0.9, texture_percentile=0.97),
            ]
        )
    )
    assert list(roles.role) == ["edge", "texture"]


def test_semantic_needs_reach():
    roles = assign_roles(_frame([_test("object") | dict(distance_frac=0.05)]))
    assert roles.role.item() == "local"


def test_scores_are_per_dataset():
    rows = [
        {
            "dataset": d,
            "image": i,
            "timestep": 500,
            "layer": "L",
            "head": 0,
            **NEUTRAL,
            "edge_affinity": 1.0 if d == "a" else 2.0,
        }
        for d in "ab"
        for i in range(3)
    ]
    scores = head_scores(pd.DataFrame(rows))
    assert np.allclose(scores.set_index("dataset").edge_affinity.loc[["a", "b"]], [1.0, 2.0])
