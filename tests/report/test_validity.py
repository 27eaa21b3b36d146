"""The validity section: each threat the run can detect is attached to the claims it concerns."""

from __future__ import annotations

from dataclasses import replace

from diffcircuit import Summary
from diffcircuit.report.validity import validity


def _manifest(**config):
    return {
        "config": {
            "mean_reference": "heldout",
            "circuit_resamples": 200,
            "role_null_block": 100,
            "role_permutations": 4999,
            "correction": "fdr_bh",
            "null_sets": 100,
        }
        | config,
        "datasets": {
            "a": {"spec": "synthetic", "n": 50, "in_training_set": 0},
            "b": {"spec": "faces", "n": 50, "in_training_set": 0},
        },
    }


def _summary(**parts):
    base = {
        "denoising": [
            {"dataset": d, "timestep": t, "informative": True} for d in "ab" for t in (100, 900)
        ],
        "role_evidence": [
            {
                "dataset": d,
                "timestep": t,
                "n_heads": 4,
                "n_positional": 0,
                "probes": {"edge": {"labelled": 1 if t == 100 else 0}},
            }
            for d in "ab"
            for t in (100, 900)
        ],
        "entropy_divergence": [
            {"timestep": t, "n_a": 50, "n_b": 50, "p_value": 0.001, "can_reject": True}
            for t in (100, 900)
        ],
        "dataset_differences": [
            {"property": "edge_energy", "differs": False, "cohens_d": 0.1, "p_corrected": 0.6}
        ],
    }
    required = {"model": {}, "seed": 0, "datasets": {}, "timesteps": [100, 900], "entropy": []}
    return Summary.from_dict(required | base | parts)


def _claims(found, kind):
    return [c for c in found["claims"] if c["kind"] == kind]


def test_a_clean_run_has_no_threats_and_every_claim_its_test():
    found = validity(_summary(), _manifest())
    assert found["threats"] == []
    assert all(c["test"] and c["correction"] and c["n"] for c in found["claims"])
    assert [c["status"] for c in _claims(found, "roles")] == ["supported", "not supported"] * 2
    assert all(c["status"] == "supported" for c in _claims(found, "divergence"))


def test_each_detected_threat_reaches_the_claims_it_concerns():
    summary = _summary(
        dataset_differences=[
            {"property": "edge_energy", "differs": True, "cohens_d": 3.3, "p_corrected": 0.001}
        ],
        ablation={"n_images": 16, "n_critical": {"layer/mean": 2}, "n_tested": {"layer/mean": 7}},
        circuits={
            "windows": [
                {
                    "dataset": "a",
                    "window": "900",
                    "timesteps": [900],
                    "claimed": True,
                    "gap": {"n_images": 16, "p_floor": 1e-4, "alpha": 0.05},
                }
            ]
        },
    )
    summary.denoising[1]["informative"] = False  # a at t = 900
    manifest = _manifest(mean_reference="insample", circuit_resamples=10)
    manifest["datasets"]["b"]["in_training_set"] = 20
    found = validity(summary, manifest)
    assert {t["kind"] for t in found["threats"]} == {
        "dataset_difference",
        "training_data",
        "in_sample_reference",
        "uninformative_timestep",
        "few_resamples",
    }
    roles = {(c["dataset"], c["timestep"]): c for c in _claims(found, "roles")}
    assert not roles[("a", 900)]["headline"] and roles[("a", 100)]["headline"]
    assert any("t = 900" in t for t in roles[("a", 900)]["threats"])
    assert not any(
        "training" in t for t in roles[("a", 100)]["threats"]
    )  # a's images were not training images
    assert any("training" in t for t in roles[("b", 100)]["threats"])
    assert not any(
        "differ in" in t for t in roles[("a", 100)]["threats"]
    )  # one dataset alone: no comparison
    divergence = {c["timestep"]: c for c in _claims(found, "divergence")}
    assert (
        any("edge_energy" in t for t in divergence[100]["threats"])
        and not divergence[900]["headline"]
    )
    circuit = _claims(found, "circuit")[0]
    assert any("resamples" in t for t in circuit["threats"]) and any(
        "own replacement" in t for t in circuit["threats"]
    )
    assert not circuit["headline"]
    assert _claims(found, "critical")[0]["status"] == "supported"


def test_tests_that_cannot_reject_are_withheld_not_negative():
    summary = _summary(
        entropy_divergence=[
            {"timestep": 100, "n_a": 2, "n_b": 2, "p_value": 0.33, "can_reject": False}
        ]
    )
    manifest = _manifest()
    manifest["datasets"]["a"]["n"] = manifest["datasets"]["b"]["n"] = 3  # 3! = 6 pairings: p >= 1/6
    summary = replace(
        summary,
        role_evidence=[
            {
                "dataset": "a",
                "timestep": 100,
                "n_heads": 4,
                "n_positional": 0,
                "probes": {"edge": {"labelled": 0}},
            }
        ],
    )
    found = validity(summary, manifest)
    assert _claims(found, "divergence")[0]["status"] == "withheld"
    assert _claims(found, "roles")[0]["status"] == "withheld"


def test_a_family_that_cannot_reject_alone_is_withheld_and_its_real_null_is_quoted():
    summary = _summary(
        ablation={
            "n_images": 16,
            "n_critical": {"head/mean": 0, "layer/mean": 0},
            "n_tested": {"head/mean": 72, "layer/mean": 7},
            "q_floor": {"head/mean": 1.0, "layer/mean": 0.049},
            "lone_critical_possible": {"head/mean": False, "layer/mean": True},
            "null_sets": {"head/mean": 71, "layer/mean": 140},
        }
    )
    critical = {c["claim"]: c for c in _claims(validity(summary, _manifest()), "critical")}
    head, layer = (
        critical["critical head components, mean ablation"],
        critical["critical layer components, mean ablation"],
    )
    assert (
        head["status"] == "withheld"
        and "71 null sets" in head["test"]
        and "other single heads" in head["test"]
    )
    assert layer["status"] == "not supported" and "140 null sets" in layer["test"]


def test_the_critical_claims_n_is_the_tests_units_the_images_of_both_datasets():
    summary = _summary(
        ablation={
            "n_images": 16,  # per dataset
            "n_units": {"layer/mean": 32},
            "n_critical": {"layer/mean": 1},
            "n_tested": {"layer/mean": 7},
        }
    )
    (claim,) = _claims(validity(summary, _manifest()), "critical")
    assert claim["n"] == 32 and "both datasets" in claim["test"]


def test_a_role_family_whose_lone_q_cannot_reach_alpha_is_withheld():
    """19 permutations: p >= 1/20 = 0.05, never below; 99 permutations over 72 heads: a lone q >= 72/100."""
    for permutations, heads in ((19, 1), (99, 72)):
        summary = _summary()
        summary = replace(
            summary,
            role_evidence=[
                {
                    "dataset": "a",
                    "timestep": 100,
                    "n_heads": heads,
                    "n_positional": 0,
                    "probes": {"edge": {"labelled": 0}},
                }
            ],
        )
        claim = _claims(validity(summary, _manifest(role_permutations=permutations)), "roles")[0]
        assert claim["status"] == "withheld", (permutations, heads)
    summary.role_evidence[0]["n_heads"] = 4  # 99 permutations over 4 heads: q can reach 0.04
    assert (
        _claims(validity(summary, _manifest(role_permutations=99)), "roles")[0]["status"]
        == "not supported"
    )


def test_divergence_and_complexity_claims_follow_the_family_corrected_q():
    rows = [
        {"timestep": t, "n_a": 50, "n_b": 50, "p_value": 0.01, "q_value": q, "can_reject": True}
        for t, q in ((100, 0.03), (900, 0.2))
    ]
    ratio = {
        "measure": "ablation_participation_ratio",
        "stand_in_for": None,
        "per_timestep": [
            {"timestep": 100, "value": 1.2, "p_value": 0.02, "q_value": 0.08, "can_reject": True}
        ],
    }
    found = validity(_summary(entropy_divergence=rows, complexity_ratio=ratio), _manifest())
    assert [c["status"] for c in _claims(found, "divergence")] == ["supported", "not supported"]
    assert all("across timesteps" in c["correction"] for c in _claims(found, "divergence"))
    complexity = _claims(found, "complexity")[0]
    assert complexity["status"] == "not supported" and "its q" in complexity["correction"]
    uncorrected = validity(
        _summary(
            complexity_ratio=ratio
            | {
                "per_timestep": [
                    {"timestep": 100, "value": 1.2, "p_value": 0.02, "can_reject": True}
                ]
            }
        ),
        _manifest(),
    )
    assert _claims(uncorrected, "complexity")[0]["correction"] == "none (no tests table)"


def test_each_key_finding_is_one_sentence_naming_its_claim_test_n_and_correction():
    import html
    import re

    from diffcircuit.report.validity import key_findings_section

    summary = _summary()
    summary.denoising[1]["informative"] = (
        False  # a at t = 900: its claims are kept out of the headline
    )
    found = validity(summary, _manifest())
    items = re.findall(r"<li>(.*?)</li>", key_findings_section(replace(summary, validity=found)))
    headline = [c for c in found["claims"] if c["test"] and c["headline"]]
    assert len(items) == len(headline) > 0 and len(headline) < len(found["claims"])
    by_claim = {html.escape(c["claim"]): c for c in headline}
    verdicts = []
    for item in items:
        claim = next(c for text, c in by_claim.items() if text in item)
        assert html.escape(claim["test"]) in item and html.escape(claim["correction"]) in item
        assert "n = " in item and item.count("<b>") == 1
        verdicts.append(claim["status"])
    order = ["supported", "not supported", "withheld"]
    assert verdicts == sorted(verdicts, key=order.index)  # supported first


def test_a_corrected_q_below_alpha_supports_the_claim_even_where_a_lone_test_could_not():
    """Under BH, k tests at the floor share q = m·floor/k: 20 tests with floor 2/252 and all at it give q ≈ 0.079,
    but with k = 20 q = 20·(2/252)/20 = 0.0079 < 0.05, although m·floor = 0.159 > 0.05 ("cannot reject" alone)."""
    from statsmodels.stats.multitest import multipletests

    from diffcircuit.report.validity import _status

    floor, m = 2 / 252, 20
    q = multipletests([floor] * m, method="fdr_bh")[1]
    assert (
        m * floor > 0.05 and q[0] < 0.05
    )  # the lone-test rule says "cannot reject"; the family rejects
    assert _status(float(q[0]), can_reject=False) == "supported"
    assert _status(0.2, can_reject=False) == "withheld" and _status(0.2) == "not supported"


def test_a_roles_claim_over_several_probes_is_corrected_across_them():
    """ "Content roles on X" is supported when some probe labels a head: a union over the k probes tested, so a
    labelled head's q must be below 0.05 / k (Bonferroni): under the global null 5 probes at 0.05 each would
    give up to 1 − 0.95^5 ≈ 0.23."""

    def evidence(min_q):
        probes = {p: {"labelled": 0, "tested": True} for p in ("edge", "texture", "intensity")}
        probes["edge"] = {"labelled": 1, "tested": True, "min_q_labelled": min_q}
        probes["object"] = {"labelled": 0, "tested": False}  # no masks: not tested, not counted
        return [
            {"dataset": "a", "timestep": 100, "n_heads": 4, "n_positional": 0, "probes": probes}
        ]

    for min_q, status in ((0.03, "not supported"), (0.01, "supported")):  # 0.05 / 3 = 0.0167
        summary = replace(_summary(), role_evidence=evidence(min_q))
        (claim,) = _claims(validity(summary, _manifest()), "roles")
        assert claim["status"] == status, min_q
        assert "Bonferroni over the 3 probes tested" in claim["correction"]


def test_a_complexity_claim_whose_datasets_differ_in_noise_says_so():
    from diffcircuit.report.validity import NOISE_RATIO_THREAT

    def claim(noise_a, noise_b):
        row = {"timestep": 100, "value": 0.6, "p_value": 0.01, "q_value": 0.02, "can_reject": True}
        summary = _summary(
            complexity_ratio={
                "measure": "ablation_participation_ratio",
                "per_timestep": [row | {"noise_a": noise_a, "noise_b": noise_b}],
            }
        )
        (found,) = _claims(validity(summary, _manifest()), "complexity")
        return found

    noisy = claim(0.38, 0.19)
    assert noisy["effect_size"]["noise_a"] == 0.38 and "a 0.38, b 0.19" in noisy["test"]
    assert any("dataset a's heads are 2x noisier" in t for t in noisy["threats"])
    close = claim(0.2, 0.2 * NOISE_RATIO_THREAT * 0.99)
    assert not any("noisier" in t for t in close["threats"])
    assert not any("noisier" in t for t in claim(None, None)["threats"])  # an older run: unknown
