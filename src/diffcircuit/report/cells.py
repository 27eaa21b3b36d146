"""Small pieces of the report's HTML: numbers, p-values with their floors, intervals with why they are withheld,
flags. Shared by the page (``report.html``) and its sections (``report.sections``)."""

from __future__ import annotations

import html

from diffcircuit.report.result import Summary

__all__ = [
    "PROPERTY_NAMES",
    "datasets_ref",
    "ci_text",
    "flagged",
    "fmt_entry",
    "fmt_num",
    "interval_cell",
    "interval_text",
    "p_cell",
    "p_text",
    "rho_text",
]


def fmt_entry(entry: dict) -> str:
    return f"{entry['mean']:.4g} [{entry['ci_low']:.4g}, {entry['ci_high']:.4g}]"


def flagged(text: str) -> str:
    return f" <span class='flag'>({html.escape(text)})</span>"


def p_cell(p, floor, can_reject: bool) -> str:
    """p, or '≤ floor' at its floor; flagged where this n cannot give p < 0.05 at all."""
    if p is None:
        return "–"
    text = f"≤ {floor:.2g}" if floor is not None and p <= floor * (1 + 1e-9) else f"{p:.3g}"
    return text + (
        "" if can_reject else flagged(f"cannot reach p < 0.05 at this n: smallest p {floor:.2g}")
    )


def interval_cell(est, low, high, withheld, digits: int = 4) -> str:
    if est is None:
        return "–"
    if withheld or low is None:
        return f"{est:.{digits}f}" + flagged(f"no interval: {withheld or 'not computed'}")
    return f"{est:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def p_text(p: float, n: int) -> str:
    return f"&lt; {1 / (n + 1):.2g}" if p <= 1 / (n + 1) + 1e-15 else f"{p:.3g}"


def ci_text(low, high) -> str:
    return "" if low is None else f" [{low:.3g}, {high:.3g}]"


def interval_text(span, ci, resamples) -> str:
    """A 95 % interval where there is one, else the bare range of the replicates with their number."""
    if ci:
        return f" [{ci[0]:.3g}, {ci[1]:.3g}]"
    return "" if not span else f" (range {span[0]:.3g}–{span[1]:.3g} over {resamples} resamples)"


def rho_text(r: dict) -> str:
    if r.get("spearman") is None:
        return "—"
    ci = (
        ""
        if r.get("ci_low") is None or r["ci_low"] != r["ci_low"]
        else f" [{r['ci_low']:.2f}, {r['ci_high']:.2f}]"
    )
    return f"{r['spearman']:.3f}{ci}"


def fmt_num(x) -> str:
    return "–" if x is None else f"{x:.3g}"


PROPERTY_NAMES = {
    "color_deviation": "colour deviation",
    "edge_energy": "edge energy",
    "texture_energy": "texture energy",
    "intensity_mean": "intensity mean",
    "intensity_sd": "intensity SD",
}


def datasets_ref(summary: Summary) -> str:
    """One sentence pointing a synthetic-vs-natural claim at the dataset differences that could explain it."""
    differing = [d for d in summary.dataset_differences or [] if d["differs"]]
    if summary.dataset_differences is None:
        return ""
    if not differing:
        return (
            " The datasets differ significantly in none of the measured image properties "
            "(<a href='#datasets'>What else differs between the datasets</a>)."
        )
    listed = ", ".join(
        f"{PROPERTY_NAMES.get(d['property'], d['property'])} (d = {d['cohens_d']:+.2f})"
        for d in differing
    )
    return (
        f" Besides their content, the datasets differ in {html.escape(listed)}: any difference here may come from those "
        "(<a href='#datasets'>What else differs between the datasets</a>)."
    )
