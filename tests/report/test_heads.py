"""Per-head pages gather a head's measurements: its values, as computed here from the tables by hand."""

from __future__ import annotations

import re

import pandas as pd

from diffcircuit import CircuitRecord, Summary
from diffcircuit.report.heads import head_pages


def test_each_head_gets_a_page_with_its_own_values():
    heads = pd.DataFrame(
        [
            {
                "dataset": "a",
                "timestep": 500,
                "layer": "mid",
                "head": h,
                "image": i,
                "entropy_norm": 0.5 + 0.1 * h + 0.01 * i,
                "effective_keys_frac": 0.2 * (h + 1),
            }
            for h in range(2)
            for i in range(2)
        ]
    )
    roles = pd.DataFrame(
        [
            {"dataset": "a", "timestep": 500, "layer": "mid", "head": h, "role": r}
            for h, r in ((0, "edge"), (1, "global"))
        ]
    )
    ablations = pd.DataFrame(
        [
            {
                "dataset": "a",
                "timestep": 500,
                "level": "head",
                "target": f"mid:{h}",
                "method": "zero",
                "image": i,
                "degradation_pct": 10.0 * (h + 1) + i,
            }
            for h in range(2)
            for i in range(2)
        ]
    )
    circuits = [
        CircuitRecord(
            dataset="a",
            window="500",
            timesteps=[500],
            method="mean",
            metric="eps",
            tau=0.05,
            ranking="exhaustive mean ablation",
            claimed=True,
            gap={},
            loss_full=1.0,
            loss_empty=2.0,
            heads=["mid:1"],
            claim="circuit: 1 heads",
        )
    ]
    summary = Summary(
        model={},
        seed=0,
        datasets={"a": {"spec": "synthetic"}},
        timesteps=[500],
        denoising=[],
        entropy=[],
    )
    page = head_pages(summary, heads, roles, ablations, circuits, None)
    details = re.findall(r"<details id='head-([^']+)'>(.*?)</details>", page, flags=re.S)
    assert [d[0] for d in details] == ["mid-0", "mid-1"]
    first, second = details[0][1], details[1][1]
    assert (
        "<td>0.505</td>" in first and "<td>edge</td>" in first and "<td>+10.50</td>" in first
    )  # means over images
    assert (
        "<td>0.605</td>" in second and "<td>global</td>" in second and "<td>+20.50</td>" in second
    )
    assert first.endswith("<td>no</td></tr></table>") and second.endswith(
        "<td>yes</td></tr></table>"
    )  # circuit
