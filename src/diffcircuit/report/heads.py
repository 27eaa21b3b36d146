"""The report's per-head pages: each head's measurements gathered in one place, collapsed until opened."""

from __future__ import annotations

import html
import re
from collections.abc import Sequence

import pandas as pd

from diffcircuit.protocol.circuits import CircuitRecord
from diffcircuit.report.result import Summary

__all__ = ["head_pages"]


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


_HEAD_CAP = 512  # heads with a drill-down of their own; beyond it, only those a claim names


def head_pages(
    summary: Summary,
    heads: pd.DataFrame,
    roles: pd.DataFrame,
    ablations: pd.DataFrame | None,
    circuits: Sequence[CircuitRecord] | None,
    gallery,
) -> str:
    """Per head, collapsed: its metrics, role, ablation effect and circuit membership per dataset and timestep,
    together; and whether the attention-map gallery shows it."""
    labels = {k: v["spec"] for k, v in summary.datasets.items()}
    keys = ["dataset", "timestep", "layer", "head"]
    metrics = heads.groupby(keys, sort=False)[["entropy_norm", "effective_keys_frac"]].mean()
    role = roles.set_index(keys)["role"] if "role" in roles else pd.Series(dtype=object)
    effects = (
        ablations[ablations.level == "head"]
        .groupby(["dataset", "timestep", "target", "method"])
        .degradation_pct.mean()
        .unstack("method")
        if ablations is not None
        else pd.DataFrame()
    )
    members = {
        (c.dataset, str(t), h)
        for c in circuits or []
        if c.claimed
        for t in c.timesteps
        for h in c.heads or []
    }
    shown = set() if gallery is None else {f"{r.layer}:{r.head}" for r in gallery[0].itertuples()}
    addresses = list(dict.fromkeys(f"{layer}:{head}" for _, _, layer, head in metrics.index))
    if len(addresses) > _HEAD_CAP:
        addresses = [a for a in addresses if a in shown or any(a == m[2] for m in members)]
    methods = list(effects.columns)
    pages = []
    for address in addresses:
        layer, head = address.rsplit(":", 1)
        rows = []
        for (ds, t, lay, hd), m in metrics.iterrows():
            if lay != layer or str(hd) != head:
                continue
            eff = effects.loc[(ds, t, address)] if (ds, t, address) in effects.index else None
            cells = [
                html.escape(labels.get(ds, ds)),
                str(t),
                f"{m.entropy_norm:.3f}",
                f"{m.effective_keys_frac:.3f}",
                html.escape(str(role.get((ds, t, lay, hd), "–"))),
            ]
            cells += [
                ("–" if eff is None or eff[k] != eff[k] else f"{eff[k]:+.2f}") for k in methods
            ]
            cells.append("yes" if (ds, str(t), address) in members else "no")
            rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
        extra = (
            " · in the <a href='#attention-maps'>attention-map gallery</a>"
            if address in shown
            else ""
        )
        head_cells = "".join(f"<th>Δ ε-MSE % ({html.escape(k)})</th>" for k in methods)
        pages.append(
            f"<details id='head-{_slug(address)}'><summary><code>{html.escape(address)}</code>{extra}</summary>"
            "<table><tr><th>dataset</th><th>t</th><th>entropy (norm.)</th><th>effective keys (frac.)</th>"
            f"<th>role</th>{head_cells}<th>in the circuit</th></tr>{''.join(rows)}</table></details>"
        )
    capped = (
        ""
        if len(pages) == len(set(f"{k[2]}:{k[3]}" for k in metrics.index))
        else (
            f" Only the {len(pages)} heads a circuit or the gallery names are listed (of more than {_HEAD_CAP})."
        )
    )
    return (
        "<h2 id='heads'>Heads, one by one</h2><p class='note'>Each head's means over images per dataset and "
        "timestep: normalised entropy, effective keys, its role, its single-head ablation effect and whether the "
        f"claimed circuit keeps it.{capped}</p>" + "\n".join(pages)
    )
