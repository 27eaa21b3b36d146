"""The report page's own rules (``report.html``), on hand-made fragments: every section heading gets an id and a
contents entry that lands on it (checked with Python's HTML parser), negative zeros and "1 heads" are tidied
without touching other numbers, and p-values and intervals say where they are floored or withheld.
(The whole page in a real browser: ``test_browser.py``.)"""

from __future__ import annotations

from html.parser import HTMLParser

import pytest

from diffcircuit.report.cells import interval_cell, p_cell
from diffcircuit.report.html import _tidy, _with_contents


class _Links(HTMLParser):
    """Every element id, every h2's id and every contents link target of a page."""

    def __init__(self):
        super().__init__()
        self.ids, self.h2, self.links, self._in_nav = [], [], [], False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.append(attrs["id"])
        if tag == "h2":
            self.h2.append(attrs.get("id"))
        if tag == "nav" and attrs.get("id") == "contents":
            self._in_nav = True
        if tag == "a" and self._in_nav:
            self.links.append(attrs["href"])

    def handle_endtag(self, tag):
        if tag == "nav":
            self._in_nav = False


def test_every_heading_gets_one_id_and_a_contents_link_that_lands_on_it():
    page = (
        "<body>{toc}<h2>Key findings</h2><p>x</p><h2 id='circuits'>Circuits <i>(τ)</i></h2>"
        "<h2>Head roles</h2><h2>Head roles</h2><h2>!!!</h2><p>{toc}</p></body>"
    )
    out = _with_contents(page)
    found = _Links()
    found.feed(out)
    assert found.h2 == ["key-findings", "circuits", "head-roles", "head-roles-2", "section"]
    assert found.links == [f"#{i}" for i in found.h2]  # in page order
    assert len(found.ids) == len(set(found.ids))  # no id twice
    assert "<a href='#circuits'>Circuits (τ)</a>" in out  # markup left out of the entry
    assert out.count("<nav id='contents'>") == 1 and out.endswith("<p>{toc}</p></body>")


@pytest.mark.parametrize(
    ("text", "tidy"),
    [
        ("<td>-0.000</td><td>−0</td><td>-0.0</td>", "<td>0.000</td><td>0</td><td>0.0</td>"),
        ("-0.001 and -0.5 and x-0 and 10-0.2", "-0.001 and -0.5 and x-0 and 10-0.2"),
        ("1 heads, 1 images, 1 circuits (1 timesteps)", "1 head, 1 image, 1 circuit (1 timestep)"),
        ("11 heads, 2.1 sets, 0,1 pairs, 1 headsets", "11 heads, 2.1 sets, 0,1 pairs, 1 headsets"),
    ],
)
def test_negative_zeros_and_singular_plurals_are_tidied_and_nothing_else(text, tidy):
    assert _tidy(text) == tidy


def test_p_values_show_their_floor_and_whether_this_n_can_reject():
    assert p_cell(None, 0.01, True) == "–"
    assert p_cell(0.0123, 0.001, True) == "0.0123"
    assert p_cell(0.001, 0.001, True) == "≤ 0.001"  # at the floor: no smaller p was possible
    flagged = p_cell(0.0625, 0.0625, False)
    assert flagged == (  # the flag's text escaped for HTML
        "≤ 0.062 <span class='flag'>(cannot reach p &lt; 0.05 at this n: smallest p 0.062)</span>"
    )


def test_intervals_name_why_they_are_withheld():
    assert interval_cell(None, 0, 1, None) == "–"
    assert interval_cell(0.5, 0.25, 0.75, None, digits=2) == "0.50 [0.25, 0.75]"
    assert interval_cell(0.5, None, None, None, digits=1) == (
        "0.5 <span class='flag'>(no interval: not computed)</span>"
    )
    assert "(no interval: 3 images &lt; 5)" in interval_cell(0.5, 0.1, 0.9, "3 images < 5")


def test_the_not_computed_note_lists_what_is_missing_and_is_absent_when_nothing_is():
    from diffcircuit.report.html import _pending_note

    assert _pending_note([]) == ""  # no dangling "Not computed in this run…: ."
    note = _pending_note(["patching", "circuits"])
    assert "Not computed in this run" in note and note.endswith("patching, circuits.</p>")


def test_heads_labelled_differently_are_shown_as_descriptive_not_as_a_difference():
    from diffcircuit import Summary
    from diffcircuit.report.html import _role_evidence_section

    evidence = {"labelled": 1, "significant": 1, "raw_only": 0}
    summary = Summary(
        model={},
        seed=0,
        datasets={"a": {"spec": "synthetic"}, "b": {"spec": "faces"}},
        timesteps=[500],
        denoising=[],
        entropy=[],
        role_evidence=[
            {"dataset": d, "timestep": 500, "probes": {"edge": evidence}, "n_positional": 0}
            for d in "ab"
        ],
        role_differences=[{"timestep": 500, "head": "mid:1", "a": "edge", "b": "unassigned"}],
    )
    section = _role_evidence_section(summary)
    assert "Heads labelled differently on the two datasets" in section
    assert "Descriptive, not a test" in section and "roles differ" not in section
