"""The report's sections on interventions and the claims built on them: ablations with the critical test,
patching, attribution, complexity, the comparison with the paper, and circuits."""

from __future__ import annotations

import html

import pandas as pd

from diffcircuit.protocol.circuits import NO_CIRCUIT
from diffcircuit.report.cells import (
    datasets_ref,
    flagged,
    fmt_entry,
    fmt_num,
    interval_cell,
    interval_text,
    p_cell,
    rho_text,
)
from diffcircuit.report.result import Summary

__all__ = [
    "ablation_section",
    "attribution_section",
    "circuit_section",
    "complexity_section",
    "not_run_reason",
    "paper_section",
    "patching_section",
]


def _excluded_note(ab: dict) -> str:
    excluded = ab.get("excluded") or []
    if not excluded:
        return ""
    pairs = ", ".join(f"{e['dataset']} at t = {e['timestep']}" for e in excluded)
    return (
        f"<p class='note'><b>Left out (uninformative: the model does not beat the trivial predictor):</b> "
        f"{html.escape(pairs)}. Ranges, largest effects and critical components use the other timesteps.</p>"
    )


def _critical_rows(ab: dict) -> str:
    return "".join(
        f"<tr><td>{html.escape(c['level'])}</td><td>{html.escape(c['method'])}</td><td>{html.escape(c['target'])}"
        + (
            f"<br><span class='note'>= {html.escape(c['also_named'])}</span>"
            if c.get("also_named")
            else ""
        )
        + f"</td><td>{c['degradation_pct']:.2f} %</td><td>{c['null_degradation_pct']:.2f} % (95th pct "
        f"{c.get('null_q95_pct', float('nan')):.2f} %)</td><td>{c['excess_pct']:.2f} [{c['ci_low']:.2f}, {c['ci_high']:.2f}]</td>"
        f"<td>{c.get('frac_sets_beaten', float('nan')):.2f} of {c.get('n_null_sets', '?')}</td>"
        f"<td>{c['p_value']:.3g} (floor {c.get('p_floor', float('nan')):.2g})</td><td>{c['p_corrected']:.3g}</td></tr>"
        for c in ab.get("critical", [])
    )


def not_run_reason(config: dict | None, analysis: str) -> str:
    """Why an intervention analysis did not run, from the run's config (``manifest.json``'s)."""
    if config is None:
        return "not selected, or ablate_n = 0"
    if analysis not in config.get("analyses", (analysis,)):
        return f"{analysis} is not among this run's analyses ({', '.join(config['analyses']) or 'none'})"
    if config.get("ablate_n") == 0:
        return "ablate_n = 0: no images were set aside for interventions"
    return "not applicable to this run"


def ablation_section(summary: Summary, png: str | None, config: dict | None = None) -> str:
    """The ablations: ranges, the largest effects, the critical components against the random-set null;
    ``config`` (the run's) says why they are missing when they are."""
    ab = summary.ablation
    if not ab:
        reason = html.escape(not_run_reason(config, "ablation"), quote=False)
        return f"<h2>Ablations</h2><p class='note'>Not run: {reason}.</p>"
    ranges = "".join(
        f"<tr><td>{html.escape(level)}</td><td>{html.escape(m)}</td><td>{lo:.2f} %</td><td>{hi:.2f} %</td></tr>"
        for level, by_method in ab["degradation_range_pct"].items()
        for m, (lo, hi) in by_method.items()
    )
    crit = "".join(
        f"<tr><td>{html.escape(c['level'])}</td><td>{html.escape(c['method'])}</td><td>{html.escape(c['target'])}</td>"
        f"<td>{fmt_entry(c['degradation_pct'])} %</td><td>{c['x0_mse_ratio']:.3f}</td></tr>"
        for c in ab["largest"]
    )
    q_floor = ab.get("q_floor", {})
    counts = ", ".join(
        f"{k}: {v} of {ab['n_tested'][k]}"
        + (f" (lowest q a lone component can reach {q_floor[k]:.2g})" if k in q_floor else "")
        for k, v in ab.get("n_critical", {}).items()
    )
    aliases = "; ".join(
        f"{html.escape(k)} = {html.escape(', '.join(v))}" for k, v in ab.get("aliases", {}).items()
    )
    return f"""<h2>Ablations</h2>
<p class="note">Paired: the same noisy inputs with and without the intervention, on {ab["n_images"]} images per dataset.
Degradation = 100·(ε-MSE ablated − clean)/clean, averaged over images, datasets and informative timesteps. "Largest"
ranks by that mean only.</p>
{_excluded_note(ab)}
<table><tr><th>level</th><th>method</th><th>smallest mean degradation</th><th>largest</th></tr>{ranges}</table>
<h3>Largest effects</h3>
<table><tr><th>level</th><th>method</th><th>target</th><th>degradation [95 % CI]</th><th>x₀-MSE ablated / clean</th></tr>{crit}</table>
<h3>Critical: more harmful than the random head sets of the same size</h3>
<p class="note">Each layer and block is compared with the distribution of random head sets of its size, each head with
the other heads (the random 1-sets); images of both datasets are the units. One-sided: p is the larger of the rank p of
the component among the sets (it beats a fraction of them; floor 1/(sets + 1)) and a sign-flip p over images of its
excess over their mean; corrected within level and method; critical = q &lt; 0.05. A head ranked among the other heads
cannot reach q &lt; 0.05 after correction over all heads (the j-th smallest rank p is at least j/heads): heads are
ranked, not called critical, by this null. {("Tested once, under the first name (the same heads): " + aliases + ".") if aliases else ""}</p>
<p class="note">Critical / tested — {html.escape(counts)}.</p>
<table><tr><th>level</th><th>method</th><th>target</th><th>degradation</th><th>random-set mean</th><th>excess [95 % CI]</th>
<th>sets beaten</th><th>p</th><th>q</th></tr>{_critical_rows(ab)}</table>
{f'<img alt="single-head ablation effects" src="data:image/png;base64,{png}" style="max-width:100%">' if png else ""}"""


def patching_section(summary: Summary) -> str:
    pt = summary.patching
    if not pt:
        return ""
    rows = "".join(
        f"<tr><td>{html.escape(r['level'])}</td><td>{html.escape(r['target'])}</td><td>{fmt_entry(r['moved_frac'])}</td></tr>"
        for r in pt["largest"]
    )
    return f"""<h2>Activation patching: {html.escape(pt["source"])} → {html.escape(pt["receiver"])}</h2>
<p class="note">{pt["n_pairs"]} image pairs, same noise and timestep; a component's activation on the source image replaces
the receiver's. Moved fraction = projection of the output change onto (source output − receiver output), over its
length²: 0 = no move, 1 = all the way. Mean over pairs and the receiver's informative timesteps
({", ".join(map(str, pt.get("timesteps") or [])) or "–"}), 95&nbsp;% CI over pairs; {html.escape(pt.get("selection") or "the top components chosen and measured on the same pairs (post-selection)")}.</p>
<table><tr><th>level</th><th>target</th><th>moved fraction [95 % CI]</th></tr>{rows}</table>"""


def attribution_section(summary: Summary) -> str:
    at = summary.attribution
    if not at:
        return ""
    labels = {k: v["spec"] for k, v in summary.datasets.items()}
    rows = []
    for r in at:
        ranking = r.get("ranking_vs_single_head")
        extra = (
            ""
            if not ranking
            else f"<br><span class='note'>ranking vs single heads: {rho_text(ranking)}</span>"
        )
        source = r if "top5_overlap" in r else (ranking or {})
        top, chance = source.get("top5_overlap"), source.get("top5_overlap_chance")
        flag = "" if r.get("informative", True) else " <b>(uninformative)</b>"
        rows.append(
            f"<tr><td>{html.escape(r['estimator'])}</td><td>{html.escape(r['method'])}</td>"
            f"<td>{html.escape(labels.get(r['dataset'], r['dataset']))}</td><td>{r['timestep']}{flag}</td>"
            f"<td>{html.escape(str(r.get('compared_with')))} (ρ over {html.escape(str(r.get('spearman_over', '—')))})</td>"
            f"<td>{rho_text(r)}{extra}</td><td>{'—' if top is None else f'{top}/5'}"
            f"{'' if chance is None else f' (chance {chance:.2g})'}</td></tr>"
        )
    return f"""<h2>Attribution patching against the exhaustive ablation it estimates</h2>
<p class="note">Gradient estimates of ablation effects. First order (one forward and one backward per batch) and +gn
(first order plus the Gauss-Newton term ‖J·Δa‖²/P from 1 random output probe) estimate each head's single-head ablation:
Spearman ρ over heads against the exhaustive sweep. ig_joint (integrated gradients, 4 steps, all heads moved along one
path) splits the all-heads ablation among the heads: its per-image total is compared with the exhaustive all-heads
ablation (ρ over images); its head ranking against single heads is shown beneath, for what it is. 95&nbsp;% CIs:
percentile bootstrap over images. Descriptive: ρ says how well the ranks agree, no test decides that they do. Top-5
overlap: the heads in both top fives, beside the overlap two random top fives would have (25 / heads).</p>
<table><tr><th>estimator</th><th>method</th><th>dataset</th><th>t</th><th>compared with</th><th>Spearman ρ [95 % CI]</th>
<th>top-5 overlap</th></tr>{"".join(rows)}</table>"""


def _tests_details(tests: pd.DataFrame | None) -> str:
    """Every hypothesis test, collapsed: what, test, statistic, p, p-floor, corrected p, effect size, n."""
    if tests is None or tests.empty:
        return ""
    rows = "".join(
        f"<tr><td>{html.escape(str(r.family))}</td><td style='text-align:left'>{html.escape(str(r.what))}</td>"
        f"<td>{html.escape(str(r.test))}</td><td>{r.statistic:.4g}</td><td>{r.p_value:.3g}</td><td>{r.p_floor:.2g}</td>"
        f"<td>{r.p_corrected:.3g}</td><td>{r.effect_size:.3g} ({html.escape(str(r.effect_size_kind))})</td>"
        f"<td>{r.n_a}</td><td>{r.n_b}</td></tr>"
        for r in tests.itertuples()
    )
    return f"""<details><summary>All {len(tests)} tests</summary>
<table><tr><th>family</th><th>what</th><th>test</th><th>statistic</th><th>p</th><th>smallest attainable p</th>
<th>corrected p</th><th>effect size</th><th>n a</th><th>n b</th></tr>{rows}</table></details>"""


def _mde_cell(r: dict, paper: float) -> str:
    if r["mde_ratio"] is None:
        return "–" + flagged(
            "no standard error: interval withheld" + (", underpowered" if r["primary"] else "")
        )
    text = f"{r['mde_ratio']:.3f}"
    return text + (
        flagged(f"underpowered: the paper's {paper} is below it")
        if r["primary"] and r["underpowered"]
        else ""
    )


def _complexity_rows(measures: list[dict], head: dict, paper: float) -> str:
    rows = []
    for r in measures:
        stand_in = head.get("stand_in_for") and r["measure"] == head["measure"]
        tag = (
            " (primary)" if r["primary"] else (" (stand-in: ablation not run)" if stand_in else "")
        )
        scope = (
            "pooled over timesteps" if r["scope"] == "pooled_over_timesteps" else str(r["timestep"])
        )
        rows.append(
            f"<tr><td>{html.escape(r['measure'])}{tag}</td><td>{scope}</td><td>{r['n_a']} / {r['n_b']}</td>"
            f"<td>{fmt_num(r['value_a'])}</td><td>{fmt_num(r['value_b'])}</td>"
            f"<td>{interval_cell(r['value'], r['ci_low'], r['ci_high'], r['ci_withheld'])}</td>"
            f"<td>{p_cell(r['p_value'], r['p_floor'], r['can_reject'])}</td>"
            f"<td>{fmt_num(r.get('noise_a'))} / {fmt_num(r.get('noise_b'))}</td><td>{_mde_cell(r, paper)}</td></tr>"
        )
    return "".join(rows)


def complexity_section(summary: Summary, test_table: pd.DataFrame | None = None) -> str:
    measures = summary.complexity_measures or []
    if not measures:
        return ""
    head = summary.complexity_ratio or {}
    paper = head.get("paper_ratio", 1.084)
    rows = _complexity_rows(measures, head, paper)
    note = f"<p class='flag'>{html.escape(head['note'])}.</p>" if head.get("stand_in_for") else ""
    labels = {k: v["spec"] for k, v in summary.datasets.items()}
    tests = summary.tests or {"n_tests": 0, "families": {}}
    fam = "".join(
        f"<tr><td>{html.escape(f)}</td><td>{html.escape(d.get('alternative', 'two-sided'))}</td><td>{d['n_tests']}</td>"
        f"<td>{d['significant_bh_0.05']}"
        + (
            f" ({d['significant_increase']} up, {d['significant_decrease']} down)"
            if "significant_increase" in d
            else ""
        )
        + "</td>"
        f"<td>{'–' if d.get('n_cannot_reject') is None else d['n_cannot_reject']}</td></tr>"
        for f, d in tests["families"].items()
    )
    return f"""<h2>Circuit complexity: {html.escape(labels["b"])} / {html.escape(labels["a"])}</h2>
<p class="note">Ratio b/a per timestep (and, labelled, pooled over timesteps: each image's values averaged over them),
with a percentile-bootstrap 95&nbsp;% CI (images resampled within each dataset; withheld below 5 images per dataset,
below 200 resamples, or when it would exclude its own estimate) and a permutation p (dataset labels shuffled over
images; exact when every split fits). The primary measure is the participation ratio of single-head ablation
effects: the effective number of heads whose removal matters. The test's null is that the datasets' per-image values
are equally distributed, not that their complexity is equal: the plug-in measure also grows with per-image noise
(noise adds to Σe², and heads without effect turn positive), so a difference in noise alone can reject it; the noise
column gives each dataset's mean standard error of a head's mean effect. Smallest detectable ratio: exp(2.80·SE of log ratio),
the ratio a two-sided α = 0.05 test with this run's standard error finds with 80&nbsp;% power, beside the paper's
{paper}.{datasets_ref(summary)}</p>{note}
<table><tr><th>measure</th><th>t</th><th>images a / b</th><th>{html.escape(labels["a"])}</th><th>{html.escape(labels["b"])}</th>
<th>ratio [95 % CI]</th><th>p</th><th>noise a / b</th><th>smallest detectable ratio</th></tr>{rows}</table>
<h3>Statistics appendix</h3>
<p class="note">{tests["n_tests"]} tests (listed below and in tables/tests.parquet with statistic, p, corrected p, effect
size and n); the run's correction (Benjamini–Hochberg by default, Holm on request) within each family.</p>
<table><tr><th>family</th><th>direction tested</th><th>tests</th><th>significant after correction (q &lt; 0.05), in
the tested direction</th><th>cannot reach q &lt; 0.05 at this n</th></tr>{fam}</table>
{_tests_details(test_table)}"""


def _paper_complexity(r: dict | None, labels: dict) -> str:
    if not r:
        return "not computed"
    if "withheld" in r:
        return f"<span class='flag'>{html.escape(r['withheld'])}</span>"
    lines = []
    entries = [*r["per_timestep"], *([r["pooled"] | {"timestep": "pooled"}] if r["pooled"] else [])]
    for e in entries:
        mde = "–" if e["mde_ratio"] is None else f"{e['mde_ratio']:.3f}"
        flag = (
            flagged(f"the paper's {r['paper_ratio']} could not have been detected")
            if e["underpowered"]
            else ""
        )
        lines.append(
            f"t = {e['timestep']}: {interval_cell(e['value'], e['ci_low'], e['ci_high'], e['ci_withheld'], 3)}, "
            f"p = {p_cell(e['p_value'], e['p_floor'], e['can_reject'])}"
            + (
                f", q = {e['q_value']:.3g} (within the complexity family)"
                if e.get("q_value") is not None
                else ""
            )
            + f"; smallest detectable ratio {mde}{flag}"
        )
    if r.get("pooled_withheld"):
        lines.append(
            f"pooled: <span class='flag'>withheld: it {html.escape(r['pooled_withheld'])}</span>"
        )
    return (
        "<br>".join(lines) + f"<br><span class='note'>{html.escape(r['measure'])}, "
        f"{html.escape(labels['b'])} / {html.escape(labels['a'])}</span>"
    )


def _paper_divergence(d: dict) -> str:
    out = [
        f"<span class='flag'>The paper's definition of divergence is {html.escape(d['paper_definition'])}.</span>"
    ]
    e = d["entropy_difference_nats"]
    if e.get("low"):
        lo, hi = e["low"], e["high"]
        low = interval_cell(
            lo["entropy_diff_nats"], lo["ci_low_nats"], lo["ci_high_nats"], lo["ci_withheld"], 3
        )
        high = interval_cell(
            hi["entropy_diff_nats"], hi["ci_low_nats"], hi["ci_high_nats"], hi["ci_withheld"], 3
        )
        out.append(
            f"Entropy b − a, mean over heads: {low} (t = {lo['timestep']}) to {high} (t = {hi['timestep']}) nats"
        )
    w = d["wasserstein_excess_nats"]
    if w.get("low"):
        lo, hi = w["low"], w["high"]
        out.append(
            f"Wasserstein-1 excess over its null: {lo['wasserstein_excess_nats']:.3f} (t = {lo['timestep']}, "
            f"p = {lo['wasserstein_p']:.3g}) to {hi['wasserstein_excess_nats']:.3f} (t = {hi['timestep']}, "
            f"p = {hi['wasserstein_p']:.3g}) nats"
        )
    j = d["legacy_jsd_bits_10bins"]
    if j.get("low"):
        out.append(
            f"<span class='note'>legacy 10-bin JSD {j['low']['legacy_jsd_bits_10bins']:.3f} – "
            f"{j['high']['legacy_jsd_bits_10bins']:.3f} bits (saturates; depends on bins and n)</span>"
        )
    return "<br>".join(out)


def paper_section(summary: Summary) -> str:
    """The paper's abstract, claim by claim, next to this run's measurement (CI, p, baseline)."""
    cmp = summary.paper_comparison
    if not cmp:
        return ""
    paper, labels = cmp["paper"], {k: v["spec"] for k, v in summary.datasets.items()}
    rows = [
        (
            "Circuit complexity, natural / synthetic",
            paper["complexity_ratio"],
            _paper_complexity(cmp.get("complexity_ratio"), labels),
        )
    ]
    d = cmp.get("divergence_range")
    if d:
        rows.append(
            (
                "Attention divergence between distributions, over timesteps",
                paper["divergence_range"],
                _paper_divergence(d),
            )
        )
    for role, claim in paper["role_entropy_nats"].items():
        entries = cmp["role_entropy_nats"].get(role) or []
        parts = []
        for e in entries:
            for key in sorted(k for k in e if k in labels):
                v = e[key]
                parts.append(
                    f"t = {e['timestep']}, {html.escape(labels[key])}: {v['entropy_nats']['mean']:.2f} "
                    f"[{v['entropy_nats']['ci_low']:.2f}, {v['entropy_nats']['ci_high']:.2f}] nats "
                    f"(uniform {v['uniform_nats']:.2f}; normalised {v['entropy_norm']:.2f}; {e['n_heads']} heads)"
                )
        rows.append(
            (f"Entropy of {role} heads", claim, "<br>".join(parts) or "no head has this role here")
        )
    ranges = cmp.get("degradation_range_pct")
    if ranges is not None:
        parts = [
            f"{level} / {method}: {lo:.1f} – {hi:.1f} %"
            for level in ("layer", "block", "head")
            if level in ranges
            for method, (lo, hi) in sorted(ranges[level].items())
        ]
        left_out = ", ".join(
            f"{e['dataset']} t = {e['timestep']}" for e in cmp.get("degradation_range_excluded", [])
        )
        if not parts:
            parts.append(
                "not measured: the model beats the trivial predictor at no ablated timestep"
            )
        if left_out:
            parts.append(
                f"<span class='note'>informative timesteps only; left out: {html.escape(left_out)}</span>"
            )
        rows.append(
            (
                "Denoising degradation when ablating",
                paper["degradation_range_pct"] + " %",
                "<br>".join(parts),
            )
        )
    body = "".join(
        f"<tr><td>{html.escape(c)}</td><td>{html.escape(p)}</td><td style='text-align:left'>{o}</td></tr>"
        for c, p, o in rows
    )
    left = cmp.get("excluded_timesteps") or []
    excluded = (
        ""
        if not left
        else f" <b>Left out</b> of the complexity, divergence and role rows: t = "
        f"{', '.join(str(t) for t in left)}, where the model does not beat the trivial predictor on both datasets "
        "(uninformative; see the headline table)."
    )
    return f"""<h2>The paper's claims, measured here</h2>
<p class="note">The abstract of arXiv 2506.17237 (a 262M-parameter UNet, 2,000 CelebA faces vs 2,000 synthetic images)
next to what this run measured on this model and data, with 95&nbsp;% CIs, p-values and the uniform-attention baseline.
The paper's numbers are not targets: they are what a different model and protocol gave. Entropies in nats depend on the
number of keys (ln 64 = 4.16 nats is uniform attention over an 8×8 map), so the normalised entropy is given too.{datasets_ref(summary)}{excluded}</p>
<table><tr><th>claim</th><th>paper</th><th>this run</th></tr>{body}</table>"""


def _gap_p_text(g: dict) -> str:
    """A gap test's p and, where it was corrected over several gap tests, its q and their number (the claim is
    decided on q)."""
    text = f"p = {g['p_value']:.2g}"
    if g.get("p_corrected") is not None and (g.get("family_size") or 1) > 1:
        text += f", q = {g['p_corrected']:.2g} ({g.get('correction')}, {g['family_size']} tests)"
    return text


def _gap_text(w: dict) -> str:
    """The gap with its 95 % interval (none below MIN_UNITS_FOR_CI images), its p and q."""
    g = w["gap"]
    if g["relative"] is None:  # the output metric: L_full = 0, the gap in its own units
        ci = "" if g["ci_low"] is None else f" [{g['ci_low']:.3g}, {g['ci_high']:.3g}]"
        return f"{g['mean']:.3g}{ci}; {_gap_p_text(g)}"
    full = w["loss_full"] / 100
    ci = "" if g["ci_low"] is None else f" [{g['ci_low'] / full:+.1f}, {g['ci_high'] / full:+.1f}]"
    return f"{g['mean'] / full:+.1f} %{ci}; {_gap_p_text(g)}"


def _circuit_rows(found: dict, labels: dict) -> str:
    rows = []
    for w in found["windows"]:
        head = (
            f"<tr><td>{html.escape(labels.get(w['dataset'], w['dataset']))}</td><td>{html.escape(w['window'])}</td>"
            f"<td>{html.escape(_gap_text(w))}</td>"
        )
        if not w["claimed"]:
            rows.append(
                head
                + f"<td colspan='7' style='text-align:left'>{html.escape(w['claim'])}</td></tr>"
            )
            continue
        o = w.get("overlap_with_other") or {}
        jac = (
            "–"
            if o.get("jaccard") is None
            else fmt_num(o["jaccard"])
            + interval_text(
                None if o.get("range_low") is None else [o["range_low"], o["range_high"]],
                None if o.get("ci_low") is None else [o["ci_low"], o["ci_high"]],
                o.get("resamples"),
            )
        )
        rows.append(
            head
            + f"<td>{w['size']}{interval_text(w.get('size_range'), w.get('size_ci'), w.get('resamples'))}</td>"
            f"<td>{fmt_num(w['faithfulness'])}</td><td>{html.escape(_out_of_bag_cell(w.get('out_of_bag')))}</td>"
            f"<td>{fmt_num(w['recovered_without_circuit'])}</td>"
            f"<td>{w['n_necessary']} of {w['size']}</td><td>{html.escape(jac)}</td>"
            f"<td style='text-align:left'>{html.escape(', '.join(w.get('unique', [])) or '–')}</td></tr>"
        )
    return "".join(rows)


def _out_of_bag_cell(oob: dict | None) -> str:
    """The out-of-bag faithfulness with the range of its resamples, or "–" where it was not estimated."""
    if not oob or oob.get("faithfulness") is None:
        return "–"
    span = None if oob.get("low") is None else [oob["low"], oob["high"]]
    return fmt_num(oob["faithfulness"]) + interval_text(span, None, oob.get("scored"))


def _circuit_complexity_rows(found: dict) -> str:
    rows = []
    for k in found.get("complexity", []):
        if "skipped" in k:
            rows.append(
                f"<tr><td>{html.escape(k['window'])}</td><td colspan='4' style='text-align:left'>"
                f"skipped: {html.escape(k['skipped'])}</td></tr>"
            )
            continue
        rows.append(
            f"<tr><td>{html.escape(k['window'])}</td><td>{k['size_a']}</td><td>{k['size_b']}</td>"
            f"<td>{fmt_num(k['ratio_b_over_a'])}{interval_text(k['ratio_range'], k['ratio_ci'], k['resamples'])}</td>"
            f"<td>{k['topk_size_a'] if k['topk_size_a'] is not None else '–'} / "
            f"{k['topk_size_b'] if k['topk_size_b'] is not None else '–'}</td></tr>"
        )
    if not rows:
        return ""
    return (
        "<p class='note'>Circuit complexity at matched gap-normalised faithfulness: per timestep, the size of each "
        f"dataset's pruned circuit (faithfulness ≥ {1 - found['tau']:g} by construction, on its own gap) and the "
        "ratio b/a; the last column is the smallest top-k circuit on the traced grid of sizes reaching the same "
        "faithfulness. Timesteps without a circuit on both datasets are skipped.</p>"
        "<table><tr><th>t</th><th>size a</th><th>size b</th><th>ratio b/a</th><th>top-k size a / b</th></tr>"
        + "".join(rows)
        + "</table>"
    )


def circuit_section(summary: Summary, pngs: dict[str, str]) -> str:
    found = summary.circuits
    if not found:
        return ""
    labels = {k: v["spec"] for k, v in summary.datasets.items()}
    figures = "".join(
        f'<img alt="{alt}" src="data:image/png;base64,{pngs[name]}" style="max-width:100%">'
        for name, alt in (
            ("circuits", "circuits on the layer x head grid"),
            ("circuit_curves", "faithfulness and recovered without circuit against size"),
        )
        if name in pngs
    )
    metric = (
        "ε-MSE against the true noise"
        if found.get("metric", "eps") == "eps"
        else "mean squared distance of ε̂ to the full model's ε̂ (ACDC's output criterion; L_full = 0)"
    )
    return f"""<h2>Circuits</h2>
<p class="note">Minimal circuits by ACDC-style pruning ({html.escape(found.get("method") or "mean")} ablation; loss:
{html.escape(metric)}; heads ranked by {html.escape(found.get("ranking") or "exhaustive mean ablation")}). The gap
L_empty − L_full is what ablating every head costs; a circuit is claimed only where the gap is significantly positive
(one-sided sign-flip permutation test over images; claimed where its q, corrected over the run's dataset x window
gap tests, is below 0.05; the column gives p and q), otherwise the row says
"{html.escape(NO_CIRCUIT)}". A circuit keeps the loss within τ = {found["tau"]} of the gap: L_circuit − L_full ≤ τ ·
(L_empty − L_full), i.e. <b>faithfulness</b> = (L_empty − L_circuit)/(L_empty − L_full) ≥ {1 - found["tau"]:g}
on the images the circuit was found on (in-sample, by construction). <b>Out of bag</b>: each bootstrap resample's
circuit, found on the images it drew (~63 % distinct), scored on the images it left out; each image's recovered
share averaged over the resamples that left it out, then Σ recovered / Σ gap over those images, with the range of
the per-resample ratios: how much of the gap a circuit found this way recovers on images it was not fitted to
(pessimistic for a circuit found on all the images).
<b>Recovered without circuit</b> = (L_empty − L(circuit ablated))/(L_empty − L_full): the share of the gap the heads
outside the circuit recover on their own (near 0: the circuit carries everything; near 1: the rest can stand in for it).
<b>Necessary</b>: circuit heads whose ablation alone, on top of everything outside the circuit, breaks τ; where fewer
than all are necessary, the others matter only jointly (e.g. redundant copies). Gaps are in % of L_full with a 95 % bootstrap CI
over images. Sizes and the Jaccard overlap carry a 95 % percentile interval only from at least 200 bootstrap resamples
of the images (discovery rerun on each); with fewer, the range of the resamples is shown and labelled as such.{datasets_ref(summary)}</p>
<table><tr><th>dataset</th><th>t</th><th>gap [95 % CI]; p, q</th><th>size</th><th>faithfulness</th>
<th>out of bag</th><th>recovered without circuit</th><th>necessary</th><th>Jaccard</th><th>heads only here</th></tr>{_circuit_rows(found, labels)}</table>
{_circuit_complexity_rows(found)}
{figures}"""
