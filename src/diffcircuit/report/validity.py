"""``summary.validity``: every headline claim with its test, n, correction and effect size, and the threats to
its validity that this run itself detected.

Threats (``threats``, each with a ``kind`` and what it concerns):

- ``dataset_difference``: the two datasets differ in an image property besides their content (colour, edges,
  texture, intensity; ``tables/datasets.parquet``) — a synthetic-vs-natural difference may come from it;
- ``training_data``: analysed images were training images of the model (``in_training_set`` > 0), or nobody
  knows (``null``);
- ``in_sample_reference``: mean ablation's reference includes the evaluated images;
- ``uninformative_timestep``: at this timestep the model does not beat the trivial predictor significantly;
  its claims are computed but left out of the headline;
- ``few_resamples``: an interval from fewer than 200 bootstrap resamples (a range, not a 95 % interval);
- ``power``: a test that cannot reach significance at this n, or a ratio smaller than the run could detect.

A claim's ``status`` is ``supported`` (its test rejects), ``not supported`` (it does not), ``withheld`` (the test
could not be run) or ``descriptive`` (an estimate with an interval, no hypothesis test).
"""

from __future__ import annotations

import math

from diffcircuit.report.result import Summary

__all__ = ["MIN_RESAMPLES", "key_findings_section", "validity", "validity_section"]

MIN_RESAMPLES = 200


def _informative(summary: Summary) -> dict[tuple[str, int], bool]:
    """(dataset, timestep) -> whether the model beats the trivial predictor there (True where untested)."""
    return {
        (d["dataset"], int(d["timestep"])): bool(d.get("informative", True))
        for d in summary.denoising or []
    }


def _threats(summary: Summary, manifest: dict) -> list[dict]:
    out = []
    labels = {k: v["spec"] for k, v in manifest["datasets"].items()}
    for d in summary.dataset_differences or []:
        if d.get("differs"):
            out.append(
                {
                    "kind": "dataset_difference",
                    "property": d["property"],
                    "cohens_d": d.get("cohens_d"),
                    "concerns": "every comparison of the two datasets",
                    "what": f"the datasets differ in {d['property']} (d = {_num(d.get('cohens_d'))}, "
                    f"q = {_num(d.get('p_corrected'))})",
                }
            )
    for key, info in manifest["datasets"].items():
        count = info.get("in_training_set", None)
        if count is None:
            out.append(
                {
                    "kind": "training_data",
                    "dataset": key,
                    "concerns": "every claim about this dataset",
                    "what": f"unknown whether the model was trained on the analysed {labels[key]} images",
                }
            )
        elif count > 0:
            out.append(
                {
                    "kind": "training_data",
                    "dataset": key,
                    "in_training_set": count,
                    "concerns": "every claim about this dataset, and every comparison with the other",
                    "what": f"{count} of the {info['n']} analysed {labels[key]} images were training images "
                    f"({info.get('intervened_in_training_set')} of those intervened on)",
                }
            )
    if manifest["config"].get("mean_reference", "insample") == "insample" and summary.ablation:
        out.append(
            {
                "kind": "in_sample_reference",
                "concerns": "mean ablation, attribution and circuits",
                "what": "mean ablation's reference is the evaluated images themselves (an image is part of its "
                "own replacement)",
            }
        )
    for (key, t), ok in _informative(summary).items():
        if not ok:
            out.append(
                {
                    "kind": "uninformative_timestep",
                    "dataset": key,
                    "timestep": t,
                    "concerns": "claims at this timestep (left out of the headline)",
                    "what": f"at t = {t} the model does not beat the trivial predictor on {labels[key]} "
                    "significantly",
                }
            )
    resamples = int(manifest["config"].get("circuit_resamples", 0))
    if summary.circuits and resamples < MIN_RESAMPLES:
        out.append(
            {
                "kind": "few_resamples",
                "concerns": "circuit sizes and overlaps",
                "what": f"{resamples} bootstrap resamples: their spread is a range, not a 95 % interval "
                f"(at least {MIN_RESAMPLES} needed)",
            }
        )
    return out


def _num(x) -> str:
    return "–" if x is None else f"{x:.3g}"


def _applies(threat: dict, *, datasets=("a", "b"), timestep=None, comparison: bool = False) -> bool:
    if threat["kind"] == "dataset_difference":
        return comparison
    if "dataset" in threat and threat["dataset"] not in datasets:
        return False
    return not ("timestep" in threat and timestep is not None and threat["timestep"] != timestep)


def _role_claims(summary: Summary, manifest: dict, informative: dict) -> list[dict]:
    out = []
    cfg = manifest["config"]
    for e in summary.role_evidence or []:
        labelled = {p: c["labelled"] for p, c in e["probes"].items() if c["labelled"]}
        # the claim is "some probe labels a head": a union over the k probes tested, each corrected over its
        # heads, so it needs a labelled head's q below 0.05 / k in some probe (Bonferroni over the probes)
        k = sum(1 for c in e["probes"].values() if c.get("tested", True)) or 1
        evidence = [
            c["min_q_labelled"]
            for c in e["probes"].values()
            if c["labelled"] and c.get("min_q_labelled") is not None
        ]
        n = manifest["datasets"][e["dataset"]]["n"]
        block = min(n, int(cfg.get("role_null_block") or n))
        floor = max(
            1 / (int(cfg.get("role_permutations") or 1) + 1), 1 / math.factorial(block)
        )  # distinct pairings
        out.append(
            {
                "claim": f"content roles on {manifest['datasets'][e['dataset']]['spec']}, t = {e['timestep']}",
                "kind": "roles",
                "dataset": e["dataset"],
                "timestep": e["timestep"],
                "test": "matched-pairing permutation test over images (each head's attention scored on the other "
                f"images' features, blocks of {cfg.get('role_null_block')}, "
                f"{cfg.get('role_permutations')} permutations, one-sided)",
                "n": manifest["datasets"][e["dataset"]]["n"],
                "correction": f"{cfg.get('correction')} over the {e['n_heads']} heads per probe; the claim (any "
                f"probe) Bonferroni over the {k} probes tested (a labelled head's q < 0.05 / {k})",
                "effect_size": "excess of the log content score over its null (log units), with d_z",
                "result": {"labelled": labelled, "n_positional": e["n_positional"]},
                "p_floor": floor,
                "q_floor": min(1.0, e["n_heads"] * floor),  # a lone head's q at the floor
                "status": (
                    "supported"
                    if labelled
                    and (not evidence or min(evidence) < 0.05 / k)  # older runs: no min_q
                    else "withheld"
                    if e["n_heads"] * floor >= 0.05 / k
                    else "not supported"
                ),
                "headline": informative.get((e["dataset"], e["timestep"]), True),
            }
        )
    return out


def _divergence_claims(summary: Summary, manifest: dict, informative: dict) -> list[dict]:
    out = []
    for r in summary.entropy_divergence or []:
        t = int(r["timestep"])
        corrected = "q_value" in r
        p = r["q_value"] if corrected else r.get("p_value")
        out.append(
            {
                "claim": f"head entropies differ between the datasets, t = {t}",
                "kind": "divergence",
                "timestep": t,
                "test": "permutation test of the mean entropy difference b − a over heads (dataset labels shuffled "
                "over images, two-sided); per head the same, and Wasserstein-1 against its null",
                "n": {"a": r.get("n_a"), "b": r.get("n_b")},
                "correction": (
                    f"{manifest['config'].get('correction')} across timesteps for the mean (its q); "
                    "over heads within the timestep per head"
                )
                if corrected
                else "none for the mean (no tests table); per head over heads within the timestep",
                "effect_size": {
                    "entropy_diff_nats": r.get("entropy_diff_nats"),
                    "ci_low": r.get("ci_low_nats"),
                    "ci_high": r.get("ci_high_nats"),
                    "n_heads_differ": r.get("n_heads_differ"),
                },
                "status": _status(p, r.get("can_reject", True)),
                "headline": informative.get(("a", t), True) and informative.get(("b", t), True),
            }
        )
    return out


def _status(p, can_reject: bool = True, alpha: float = 0.05) -> str:
    """``p`` (corrected): below α supports the claim, whatever the lone-test floor says (under BH several tests at
    their floor can reach α together); otherwise "withheld" where a lone effect could not have reached α at this
    n, else "not supported"."""
    if p is None or p != p:
        return "withheld"
    if p < alpha:
        return "supported"
    return "not supported" if can_reject else "withheld"


def _critical_claims(summary: Summary, manifest: dict) -> list[dict]:
    ablation = summary.ablation
    if not ablation:
        return []
    out = []
    for key in sorted(ablation.get("n_critical") or {}):
        n_null = (ablation.get("null_sets") or {}).get(key, manifest["config"].get("null_sets"))
        null = (
            "the other single heads"
            if key.startswith("head/")
            else "random head sets of the same size, scattered over the model: a component that beats them "
            "is more harmful than as many scattered heads, which co-location alone can make it"
        )
        possible = (ablation.get("lone_critical_possible") or {}).get(key, True)
        out.append(
            {
                "claim": f"critical {key.replace('/', ' components, ')} ablation",
                "kind": "critical",
                "test": f"rank among {n_null} null sets ({null}) per component and a sign-flip test over images "
                "(one-sided; n counts the images of both datasets, pooled, each averaged over the informative "
                "timesteps)",
                "n": (ablation.get("n_units") or {}).get(key, ablation.get("n_images")),
                "correction": f"{manifest['config'].get('correction')} within level x method",
                "effect_size": "excess degradation over the null sets, % of the clean ε-MSE",
                "result": {
                    "n_critical": ablation["n_critical"].get(key),
                    "n_tested": ablation["n_tested"].get(key),
                    "q_floor": (ablation.get("q_floor") or {}).get(key),
                },
                "status": (
                    "supported"
                    if ablation["n_critical"].get(key)
                    else "not supported"
                    if possible
                    else "withheld"
                ),
                "headline": True,
            }
        )
    return out


def _circuit_claims(summary: Summary, informative: dict) -> list[dict]:
    found = summary.circuits
    if not found:
        return []
    out = []
    for c in found.get("windows") or []:
        gap = c.get("gap") or {}
        ts = [int(t) for t in c.get("timesteps") or []]
        out.append(
            {
                "claim": f"a circuit on dataset {c['dataset']}, t = {c['window']}: ablating every head "
                "hurts (the heads found and their faithfulness are in-sample estimates, not tested; the "
                "out-of-bag faithfulness says how much of the gap such a circuit recovers on images it was "
                "not found on)",
                "kind": "circuit",
                "dataset": c["dataset"],
                "timestep": ts[0] if len(ts) == 1 else None,
                "test": "one-sided sign-flip permutation test over images that ablating every head hurts "
                "(the gap L_empty − L_full > 0)",
                "n": gap.get("n_images"),
                "correction": (
                    f"{gap['correction']} over the {gap.get('family_size')} dataset x window gap tests"
                    if gap.get("correction", "none") != "none"
                    else "none across windows"
                ),
                "effect_size": {
                    "gap_rel": gap.get("relative"),
                    "size": c.get("size"),
                    "faithfulness": c.get("faithfulness"),
                    "faithfulness_out_of_bag": (c.get("out_of_bag") or {}).get("faithfulness"),
                },
                "status": (
                    "supported"
                    if c.get("claimed")
                    else "withheld"
                    if (gap.get("q_floor", gap.get("p_floor")) or 0) >= gap.get("alpha", 0.05)
                    else "not supported"
                ),
                "headline": all(informative.get((c["dataset"], t), True) for t in ts),
            }
        )
    return out


NOISE_RATIO_THREAT = (
    1.25  # per-image noise this much larger on one side: the plug-in measure may follow it
)


def _noise_threats(a: float | None, b: float | None) -> list[str]:
    """A complexity claim's threat when one dataset's per-image noise (``a``, ``b``) is well above the other's:
    the plug-in measure grows with noise, and the permutation's null (equal distributions) is rejected by noise
    alone."""
    if not a or not b or max(a, b) / min(a, b) < NOISE_RATIO_THREAT:
        return []
    noisier, ratio = ("a", a / b) if a > b else ("b", b / a)
    return [
        f"per-image noise differs: dataset {noisier}'s heads are {ratio:.2g}x noisier (mean standard error of a "
        "head's mean); the plug-in measure grows with noise, so part or all of the ratio may be noise, not "
        "complexity"
    ]


def _complexity_claims(summary: Summary, informative: dict) -> list[dict]:
    ratio = summary.complexity_ratio
    if not ratio:
        return []
    out = []
    for r in ratio.get("per_timestep") or []:
        t = int(r["timestep"])
        corrected = "q_value" in r
        out.append(
            {
                "claim": f"complexity ratio b/a ({ratio['measure']}) differs from 1, t = {t}",
                "kind": "complexity",
                "timestep": t,
                "stand_in_for": ratio.get("stand_in_for"),
                "test": "permutation test of the ratio (dataset labels shuffled over images; H0: the datasets' "
                "per-image values are equally distributed, so a difference in per-image noise alone can reject "
                "it — the plug-in measure grows with noise; mean standard error of a head's mean: "
                f"a {_num(r.get('noise_a'))}, b {_num(r.get('noise_b'))})",
                "n": {"a": r.get("n_a"), "b": r.get("n_b")},
                "correction": (
                    "within the complexity family (every measure, every timestep and pooled; its q)"
                    if corrected
                    else "none (no tests table)"
                ),
                "effect_size": {
                    "ratio": r.get("value"),
                    "ci_low": r.get("ci_low"),
                    "ci_high": r.get("ci_high"),
                    "smallest_detectable_ratio": r.get("mde_ratio"),
                    "noise_a": r.get("noise_a"),
                    "noise_b": r.get("noise_b"),
                },
                "status": _status(
                    r["q_value"] if corrected else r.get("p_value"), r.get("can_reject", True)
                ),
                "underpowered": r.get("underpowered"),
                "headline": informative.get(("a", t), True) and informative.get(("b", t), True),
                "threats": _noise_threats(
                    r.get("noise_a"), r.get("noise_b")
                ),  # the loop adds the rest
            }
        )
    return out


def _descriptive(summary: Summary) -> list[dict]:
    out = []
    if summary.patching:
        out.append(
            {
                "claim": "components that move the receiver's output toward the source's (patching)",
                "kind": "patching",
                "test": None,
                "status": "descriptive",
                "effect_size": "moved fraction with a bootstrap CI over image pairs ("
                + (summary.patching.get("selection") or "chosen and measured on the same pairs")
                + ")",
                "headline": True,
            }
        )
    if summary.attribution:
        out.append(
            {
                "claim": "rank agreement of attribution with the exhaustive sweep (Spearman ρ per estimator, "
                "method, dataset and timestep; whatever ρ is, agreement is not tested)",
                "kind": "attribution",
                "test": None,
                "status": "descriptive",
                "effect_size": "Spearman ρ with a bootstrap CI over images; top-5 overlap beside its chance "
                "level (25 / heads)",
                "headline": True,
            }
        )
    return out


def validity(summary: Summary, manifest: dict) -> dict:
    """Every headline claim with its test and the threats that apply to it (module docstring)."""
    informative = _informative(summary)
    threats = _threats(summary, manifest)
    claims = (
        _role_claims(summary, manifest, informative)
        + _divergence_claims(summary, manifest, informative)
        + _critical_claims(summary, manifest)
        + _circuit_claims(summary, informative)
        + _complexity_claims(summary, informative)
        + _descriptive(summary)
    )
    for claim in claims:
        datasets = (claim["dataset"],) if claim.get("dataset") else ("a", "b")
        comparison = claim["kind"] in ("divergence", "complexity")
        here = [
            t["what"]
            for t in threats
            if _applies(t, datasets=datasets, timestep=claim.get("timestep"), comparison=comparison)
            and (t["kind"] != "few_resamples" or claim["kind"] == "circuit")
            and (t["kind"] != "in_sample_reference" or claim["kind"] in ("critical", "circuit"))
        ]
        if claim.get("underpowered"):
            here.append(
                "underpowered: the smallest ratio this run could detect is larger than the paper's 1.084 "
                "(a ratio of a measure the paper does not define: the scales may not match)"
            )
        here += claim.get("threats", [])  # what its own builder found
        if claim["status"] == "withheld":
            here.append("the test cannot reach significance at this n (or could not be run)")
        claim["threats"] = here
    return {
        "claims": claims,
        "threats": threats,
        "rule": "a claim enters the headline only with its test; claims at uninformative timesteps are computed "
        "but kept out of the headline (headline: false)",
    }


def _cell(x) -> str:
    import html
    import json

    if isinstance(x, dict):
        return html.escape(
            ", ".join(
                f"{k} {_num(v) if isinstance(v, float) else v}"
                for k, v in x.items()
                if v is not None
            )
        )
    return html.escape(
        json.dumps(x) if isinstance(x, (list, tuple)) else str(x if x is not None else "–")
    )


def validity_section(summary: Summary) -> str:
    """The report's "Validity" section: one row per claim, and the threats this run detected."""
    import html

    found = summary.validity
    if not found:
        return ""
    rows = []
    for c in found["claims"]:
        flag = "" if c.get("headline", True) else " <span class='flag'>not in the headline</span>"
        rows.append(
            "<tr>"
            + "".join(
                f"<td>{v}</td>"
                for v in (
                    html.escape(c["claim"]) + flag,
                    html.escape(c["status"]),
                    _cell(c.get("test") or "none (descriptive)"),
                    _cell(c.get("n")),
                    _cell(c.get("correction")),
                    _cell(c.get("effect_size")),
                    "<br>".join(html.escape(t) for t in c["threats"]) or "none detected",
                )
            )
            + "</tr>"
        )
    threats = "".join(
        f"<li>{html.escape(t['what'])} — concerns {html.escape(t['concerns'])}</li>"
        for t in found["threats"]
    )
    return (
        "<h2 id='validity'>Validity</h2><p class='note'>Every headline claim with its test, n, correction and effect "
        "size, and the threats to it that this run itself detected. "
        + html.escape(found["rule"])
        + ".</p>"
        + (f"<ul>{threats}</ul>" if threats else "<p class='note'>No threat detected.</p>")
        + "<table><tr><th>claim</th><th>status</th><th>test</th><th>n</th><th>correction</th><th>effect size</th>"
        "<th>threats</th></tr>" + "\n".join(rows) + "</table>"
    )


_VERDICT = {"supported": "Supported", "not supported": "Not supported", "withheld": "Withheld"}


def _finding(claim: dict) -> str:
    """One sentence: the verdict, the claim, and the test behind it with its n and correction."""
    import html

    n = claim.get("n")
    n_text = (
        f"n = {n}"
        if not isinstance(n, dict)
        else "n = " + ", ".join(f"{v} ({k})" for k, v in n.items() if v is not None)
    )
    result = claim.get("result") or claim.get("effect_size")
    shown = ""
    if isinstance(result, dict):
        parts = [
            f"{k.replace('_', ' ')} {_num(v) if isinstance(v, float) else v}"
            for k, v in result.items()
            if v not in (None, {}, [])
        ]
        shown = f"; {', '.join(parts)}" if parts else ""
    why = " (the test cannot reach significance at this n)" if claim["status"] == "withheld" else ""
    return (
        f"<li><b>{_VERDICT[claim['status']]}</b>: {html.escape(claim['claim'])}{why} — "
        f"{html.escape(claim['test'])}; {html.escape(n_text)}; {html.escape(str(claim.get('correction') or 'none'))}"
        f"{html.escape(shown)}.</li>"
    )


def key_findings_section(summary: Summary) -> str:
    """The report's first section: each headline claim in one sentence with its test (from ``summary.validity``),
    supported ones first; descriptive measures and claims kept out of the headline are left to the sections below."""
    found = summary.validity
    if not found:
        return ""
    tested = [
        c
        for c in found["claims"]
        if c.get("test") and c.get("headline", True) and c["status"] in _VERDICT
    ]
    order = {"supported": 0, "not supported": 1, "withheld": 2}
    items = "\n".join(_finding(c) for c in sorted(tested, key=lambda c: order[c["status"]]))
    kept_out = sum(1 for c in found["claims"] if not c.get("headline", True))
    note = (
        f" {kept_out} claim{'s' if kept_out != 1 else ''} at uninformative timesteps "
        "(where the model does not beat the trivial predictor) are computed but kept out of this list."
        if kept_out
        else ""
    )
    return (
        "<h2 id='key-findings'>Key findings</h2><p class='note'>Every headline claim of this run, one sentence each "
        "with the test behind it (details, effect sizes and threats: <a href='#validity'>Validity</a>)."
        + note
        + f"</p><ul>{items or '<li>No claim was tested in this run.</li>'}</ul>"
    )
