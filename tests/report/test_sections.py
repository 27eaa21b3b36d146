"""The report's intervention and claim sections: what they say when an analysis is missing."""

from __future__ import annotations

from diffcircuit import Summary
from diffcircuit.report.sections import ablation_section, not_run_reason


def _summary(**fields) -> Summary:
    required = {"model": {}, "seed": 0, "datasets": {}, "timesteps": [500], "denoising": []}
    return Summary.from_dict(required | {"entropy": []} | fields)


def test_a_missing_analysis_gives_the_reason_this_run_had():
    not_selected = {"analyses": ["patching"], "ablate_n": 16}
    assert not_run_reason(not_selected, "ablation") == (
        "ablation is not among this run's analyses (patching)"
    )
    assert "(none)" in not_run_reason({"analyses": [], "ablate_n": 16}, "ablation")
    no_images = {"analyses": ["ablation", "patching"], "ablate_n": 0}
    assert not_run_reason(no_images, "ablation").startswith("ablate_n = 0")
    assert (
        not_run_reason(None, "ablation") == "not selected, or ablate_n = 0"
    )  # an older run: unknown


def test_the_ablation_section_says_why_it_is_empty_without_naming_a_flag():
    html = ablation_section(_summary(), None, {"analyses": [], "ablate_n": 16})
    assert "Not run: ablation is not among this run's analyses (none)." in html
    assert (
        "--" not in html
    )  # the report speaks of the config's fields, as manifest.json records them


def _window(dataset: str, out_of_bag: dict | None) -> dict:
    gap = {"mean": 0.2, "ci_low": 0.1, "ci_high": 0.3, "relative": 0.5, "p_value": 0.01}
    gap |= {"p_corrected": 0.03, "family_size": 6, "correction": "fdr_bh"}
    return {
        "dataset": dataset,
        "window": "500",
        "timesteps": [500],
        "claimed": True,
        "claim": "circuit",
        "gap": gap,
        "loss_full": 0.4,
        "size": 3,
        "size_range": [2, 4],
        "size_ci": None,
        "resamples": 10,
        "faithfulness": 0.96,
        "out_of_bag": out_of_bag,
        "recovered_without_circuit": 0.1,
        "n_necessary": 3,
        "necessary": [],
        "unique": [],
    }


def test_the_circuit_table_gives_the_out_of_bag_faithfulness_beside_the_in_sample_one():
    from diffcircuit.report.sections import circuit_section

    oob = {"faithfulness": 0.812, "low": 0.55, "high": 0.97, "scored": 9}
    found = {"tau": 0.05, "windows": [_window("a", oob), _window("b", None)], "complexity": []}
    page = circuit_section(_summary(circuits=found), {})
    rows = page.split("<tr>")[2:]  # the header, then one row per window
    assert "<td>0.96</td><td>0.812 (range 0.55–0.97 over 9 resamples)</td>" in rows[0]
    assert "<td>0.96</td><td>–</td>" in rows[1]  # an older record, or no resamples: not estimated
    assert "<th>out of bag</th>" in page and "left out" in page
    # the claim is decided on q: the gap column gives it beside p, and the text does not say "uncorrected"
    assert "p = 0.01, q = 0.03 (fdr_bh, 6 tests)" in rows[0] and "uncorrected" not in page
