"""The validity section: each threat the run can detect is attached to the claims it concerns."""

from __future__ import annotations

from diffcircuit.report.validity import validity


def _manifest(**config):
    return {"config": {"mean_reference": "heldout", "circuit_resamples": 200, "role_null_block": 100,
                       "role_permutations": 4999, "correction": "fdr_bh", "null_sets": 100} | config,
            "datasets": {"a": {"spec": "synthetic", "n": 50, "in_training_set": 0},
                         "b": {"spec": "faces", "n": 50, "in_training_set": 0}}}


def _summary(**parts):
    base = {"denoising": [{"dataset": d, "timestep": t, "informative": True} for d in "ab" for t in (100, 900)],
            "role_evidence": [{"dataset": d, "timestep": t, "n_heads": 4, "n_positional": 0,
                               "probes": {"edge": {"labelled": 1 if t == 100 else 0}}} for d in "ab" for t in (100, 900)],
            "entropy_divergence": [{"timestep": t, "n_a": 50, "n_b": 50, "p_value": 0.001, "can_reject": True}
                                   for t in (100, 900)],
            "dataset_differences": [{"property": "edge_energy", "differs": False, "cohens_d": 0.1, "p_corrected": 0.6}]}
    return base | parts


def _claims(found, kind):
    return [c for c in found["claims"] if c["kind"] == kind]


def test_a_clean_run_has_no_threats_and_every_claim_its_test():
    found = validity(_summary(), _manifest())
    assert found["threats"] == []
    assert all(c["test"] and c["correction"] and c["n"] for c in found["claims"])
    assert [c["status"] for c in _claims(found, "roles")] == ["supported", "not supported"] * 2
    assert all(c["status"] == "supported" for c in _claims(found, "divergence"))


def test_each_detected_threat_reaches_the_claims_it_concerns():
    summary = _summary(dataset_differences=[{"property": "edge_energy", "differs": True, "cohens_d": 3.3,
                                             "p_corrected": 0.001}],
                       ablation={"n_images": 16, "n_critical": {"head/mean": 2}, "n_tested": {"head/mean": 72}},
                       circuits={"windows": [{"dataset": "a", "window": "900", "timesteps": [900], "claimed": True,
                                              "gap": {"n_images": 16, "p_floor": 1e-4, "alpha": 0.05}}]})
    summary["denoising"][1]["informative"] = False  # a at t = 900
    manifest = _manifest(mean_reference="insample", circuit_resamples=10)
    manifest["datasets"]["b"]["in_training_set"] = 20
    found = validity(summary, manifest)
    assert {t["kind"] for t in found["threats"]} == {"dataset_difference", "training_data", "in_sample_reference",
                                                     "uninformative_timestep", "few_resamples"}
    roles = {(c["dataset"], c["timestep"]): c for c in _claims(found, "roles")}
    assert not roles[("a", 900)]["headline"] and roles[("a", 100)]["headline"]
    assert any("t = 900" in t for t in roles[("a", 900)]["threats"])
    assert not any("training" in t for t in roles[("a", 100)]["threats"])  # a's images were not training images
    assert any("training" in t for t in roles[("b", 100)]["threats"])
    assert not any("differ in" in t for t in roles[("a", 100)]["threats"])  # one dataset alone: no comparison
    divergence = {c["timestep"]: c for c in _claims(found, "divergence")}
    assert any("edge_energy" in t for t in divergence[100]["threats"]) and not divergence[900]["headline"]
    circuit = _claims(found, "circuit")[0]
    assert any("resamples" in t for t in circuit["threats"]) and any("own replacement" in t for t in circuit["threats"])
    assert not circuit["headline"]
    assert _claims(found, "critical")[0]["status"] == "supported"


def test_tests_that_cannot_reject_are_withheld_not_negative():
    summary = _summary(entropy_divergence=[{"timestep": 100, "n_a": 2, "n_b": 2, "p_value": 0.33,
                                            "can_reject": False}])
    manifest = _manifest()
    manifest["datasets"]["a"]["n"] = manifest["datasets"]["b"]["n"] = 3  # 3! = 6 pairings: p >= 1/6
    summary["role_evidence"] = [{"dataset": "a", "timestep": 100, "n_heads": 4, "n_positional": 0,
                                 "probes": {"edge": {"labelled": 0}}}]
    found = validity(summary, manifest)
    assert _claims(found, "divergence")[0]["status"] == "withheld"
    assert _claims(found, "roles")[0]["status"] == "withheld"
