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
