"""``report.html``: a self-contained page (figures embedded) rebuilt from a run directory's files."""

from __future__ import annotations

import base64
import html
from pathlib import Path

import pandas as pd

from diffcircuit.protocol.circuits import NO_CIRCUIT
from diffcircuit.protocol.store import atomic_write_bytes
from diffcircuit.report.figures import (
    ablation_bars,
    attention_gallery,
    attribution_scatter,
    circuit_curves_plot,
    circuit_map,
    divergence_plot,
    entropy_heatmap,
    patching_grid,
    png_bytes,
    role_map,
    token_heatmap_figure,
)
from diffcircuit.report.heads import head_pages
from diffcircuit.report.summary import informative_pairs
from diffcircuit.report.validity import key_findings_section, validity_section

__all__ = ["write_report"]


def _fmt(entry: dict) -> str:
    return f"{entry['mean']:.4g} [{entry['ci_low']:.4g}, {entry['ci_high']:.4g}]"


def _headline_rows(summary: dict) -> str:
    entropy = {(e["dataset"], e["timestep"]): e["entropy_norm"] for e in summary["entropy"]}
    rows = []
    for d in summary["denoising"]:
        key = (d["dataset"], d["timestep"])
        rows.append(
            "<tr>"
            + "".join(
                f"<td>{html.escape(str(v))}</td>"
                for v in (
                    summary["datasets"][d["dataset"]]["spec"],
                    d["timestep"],
                    _fmt(d["eps_mse"]),
                    _fmt(d["eps_mse_trivial"]),
                    _fmt(d["x0_mse"]),
                    _fmt(d["x0_mse_trivial"]),
                    _fmt(entropy[key]),
                )
            )
            + f"<td>{_informative_cell(d)}</td></tr>"
        )
    return "\n".join(rows)


def _flag(text: str) -> str:
    return f" <span class='flag'>({html.escape(text)})</span>"


def _p_cell(p, floor, can_reject: bool) -> str:
    """p, or '≤ floor' at its floor; flagged where this n cannot give p < 0.05 at all."""
    if p is None:
        return "–"
    text = f"≤ {floor:.2g}" if floor is not None and p <= floor * (1 + 1e-9) else f"{p:.3g}"
    return text + (
        "" if can_reject else _flag(f"cannot reach p < 0.05 at this n: smallest p {floor:.2g}")
    )


def _interval(est, low, high, withheld, digits: int = 4) -> str:
    if est is None:
        return "–"
    if withheld or low is None:
        return f"{est:.{digits}f}" + _flag(f"no interval: {withheld or 'not computed'}")
    return f"{est:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def _informative_cell(d: dict) -> str:
    """Whether the model beats the trivial predictor at this dataset and timestep (paired, one-sided, corrected)."""
    if "informative" not in d:
        return "—"
    ratio = f"ε-MSE / trivial {d['ratio_to_trivial']:.3f}, worse on {100 * d['frac_images_worse']:.0f} % of images"
    if d["informative"]:
        return f"yes, q = {d['p_corrected']:.2g}<br><span class='note'>{ratio}</span>"
    return (
        f"<b>no: uninformative</b>, q = {d['p_corrected']:.2g}<br><span class='note'>{ratio}; "
        "left out of the headline claims</span>"
    )


def _divergence_rows(summary: dict) -> str:
    rows = []
    excluded = set((summary.get("paper_comparison") or {}).get("excluded_timesteps", []))
    for d in summary["entropy_divergence"]:
        t = str(d["timestep"]) + (
            _flag("uninformative: not a headline claim") if int(d["timestep"]) in excluded else ""
        )
        differ = f"{d['n_heads_differ']} / {d['n_heads']}" + (
            "" if d["heads_can_reject"] else _flag("no single head can reach q < 0.05 at this n")
        )
        rows.append(
            f"<tr><td>{t}</td><td>{d['n_a']} / {d['n_b']}</td>"
            f"<td>{_interval(d['entropy_diff_nats'], d['ci_low_nats'], d['ci_high_nats'], d['ci_withheld'])}</td>"
            f"<td>{_interval(d['entropy_diff_norm'], d['ci_low_norm'], d['ci_high_norm'], d['ci_withheld'])}</td>"
            f"<td>{_p_cell(d['p_value'], d['p_floor'], d['can_reject'])}</td><td>{differ}</td>"
            f"<td>{d['wasserstein_nats']:.4f}</td><td>{d['wasserstein_null_mean_nats']:.4f}</td>"
            f"<td>{d['wasserstein_excess_nats']:.4f}</td>"
            f"<td>{_p_cell(d['wasserstein_p'], d['wasserstein_p_floor'], d['wasserstein_can_reject'])}</td>"
            f"<td>{d['legacy_jsd_bits_10bins']:.3f}</td></tr>"
        )
    return "\n".join(rows)


def _differing_heads(summary: dict) -> str:
    parts = []
    for e in summary.get("entropy_difference_heads") or []:
        heads = ", ".join(
            f"{html.escape(h['layer'])}:{h['head']} {h['diff_nats']:+.3f}"
            + (
                f" [{h['ci_low_nats']:+.3f}, {h['ci_high_nats']:+.3f}]"
                if h["ci_low_nats"] is not None
                else ""
            )
            + f" (q = {h['q_value']:.2g})"
            for h in e["largest"]
        )
        parts.append(
            f"<li>t = {e['timestep']}: {e['n_heads_differ']} of {e['n_heads']} heads differ"
            + (f"; largest: {heads}" if heads else "")
            + "</li>"
        )
    return f"<ul class='note'>{''.join(parts)}</ul>" if parts else ""


def _divergence_section(summary: dict, png: str) -> str:
    div = summary["entropy_divergence"]
    r = div[0] if div else {}
    return f"""<h2>Synthetic vs natural: how head entropies differ</h2>
<p class="note">Per timestep. <b>Entropy difference</b>: each head's mean entropy on b minus a (nats, and normalised by
ln n_keys), averaged over heads; 95&nbsp;% percentile-bootstrap CI ({r.get("n_resamples", "–")} resamples, images resampled
within each dataset; withheld below 5 images per dataset) and a two-sided permutation p (dataset labels shuffled over
images; {r.get("n_permutations", "–")} permutations, or every split when fewer). Heads that differ: q &lt; 0.05,
Benjamini–Hochberg over the timestep's heads (tables/divergence_heads.parquet). <b>Divergence</b> (bin-free): the
Wasserstein-1 distance between the two datasets' distributions of a head's per-image entropy (nats), averaged over heads;
it is &gt; 0 even between samples of one distribution, so it is given with its permutation-null mean, the excess over
it, and the one-sided permutation p. The legacy 10-bin Jensen–Shannon divergence (bits) saturates and depends on the bins
and n; it is shown for comparison with older runs only.{_datasets_ref(summary)}</p>
<table><tr><th>t</th><th>images a / b</th><th>entropy b − a, nats [95 % CI]</th><th>normalised [95 % CI]</th><th>p</th>
<th>heads that differ</th><th>W1 (nats)</th><th>null mean</th><th>excess</th><th>p (W1)</th><th>legacy JSD</th></tr>
{_divergence_rows(summary)}
</table>
{_differing_heads(summary)}
<img alt="entropy difference and null-corrected divergence across timesteps" src="data:image/png;base64,{png}" style="max-width:90%">"""


def _p(p: float, n: int) -> str:
    return f"&lt; {1 / (n + 1):.2g}" if p <= 1 / (n + 1) + 1e-15 else f"{p:.3g}"


def _role_rows(summary: dict) -> str:
    labels = {k: v["spec"] for k, v in summary["datasets"].items()}
    keep = informative_pairs(summary)
    rows = []
    for r in summary["roles"]:
        d = r["per_dataset"][r["dataset"]]
        excess = r.get("excess_log")
        evidence = html.escape(r["basis"]) + (
            ""
            if not excess
            else f"; excess over null (log) median {excess['median']:.3f}, max q {excess['max_q']:.2g}"
        )
        uninformative = (r["dataset"], int(r["timestep"])) not in keep
        cells = [
            html.escape(labels.get(r["dataset"], r["dataset"])),
            html.escape(r["role"])
            + (_flag("uninformative timestep: not a headline claim") if uninformative else ""),
            str(r["timestep"]),
            str(r["n_heads"]),
            f"{_fmt(d['entropy_nats'])} (uniform {d['uniform_nats']:.2f}; "
            f"norm. {d['entropy_norm']['mean']:.3f})",
            evidence,
            html.escape(r["definition"]),
        ]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return "\n".join(rows)


def _role_evidence_section(summary: dict) -> str:
    labels = {k: v["spec"] for k, v in summary["datasets"].items()}
    rows = []
    for e in summary.get("role_evidence") or []:
        cells = [html.escape(labels.get(e["dataset"], e["dataset"])), str(e["timestep"])]
        cells += [
            f"{c['labelled']} / {c['significant']} / {c['raw_only']}" for c in e["probes"].values()
        ]
        cells.append(str(e["n_positional"]))
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    if not rows:
        return ""
    probes = list(summary["role_evidence"][0]["probes"])
    differ = summary.get("role_differences") or []
    diff_rows = "".join(
        f"<tr><td>{d['timestep']}</td><td>{html.escape(d['head'])}</td><td>{html.escape(d['a'])}</td>"
        f"<td>{html.escape(d['b'])}</td></tr>"
        for d in differ
    )
    return (
        "<h3>Content roles against their null</h3><p class='note'>Per probe: heads it labels / heads whose "
        "excess over the null (the same head scored on the other images' features) is significant / heads whose "
        "raw affinity passes the raw threshold but not the null — their score is explained by where they look "
        "(<i>positional</i> when no geometric role applies).</p><table><tr><th>dataset</th><th>t</th>"
        + "".join(f"<th>{html.escape(p)}</th>" for p in probes)
        + "<th>positional</th></tr>"
        + "\n".join(rows)
        + "</table>"
        + (
            f"<h3>Where the datasets' roles differ</h3><p class='note'>{len(differ)} head × timestep "
            "pairs.</p><table><tr><th>t</th><th>head</th><th>"
            + html.escape(labels.get("a", "a"))
            + "</th><th>"
            + html.escape(labels.get("b", "b"))
            + "</th></tr>"
            + diff_rows
            + "</table>"
            if differ
            else "<p class='note'>Both datasets give every head the same role.</p>"
        )
    )


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


def _ablation_section(summary: dict, png: str | None) -> str:
    ab = summary.get("ablation")
    if not ab:
        return "<h2>Ablations</h2><p class='note'>Not run (--ablate-n 0).</p>"
    ranges = "".join(
        f"<tr><td>{html.escape(level)}</td><td>{html.escape(m)}</td><td>{lo:.2f} %</td><td>{hi:.2f} %</td></tr>"
        for level, by_method in ab["degradation_range_pct"].items()
        for m, (lo, hi) in by_method.items()
    )
    crit = "".join(
        f"<tr><td>{html.escape(c['level'])}</td><td>{html.escape(c['method'])}</td><td>{html.escape(c['target'])}</td>"
        f"<td>{_fmt(c['degradation_pct'])} %</td><td>{c['x0_mse_ratio']:.3f}</td></tr>"
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


def _patching_section(summary: dict) -> str:
    pt = summary.get("patching")
    if not pt:
        return ""
    rows = "".join(
        f"<tr><td>{html.escape(r['level'])}</td><td>{html.escape(r['target'])}</td><td>{_fmt(r['moved_frac'])}</td></tr>"
        for r in pt["largest"]
    )
    return f"""<h2>Activation patching: {html.escape(pt["source"])} → {html.escape(pt["receiver"])}</h2>
<p class="note">{pt["n_pairs"]} image pairs, same noise and timestep; a component's activation on the source image replaces
the receiver's. Moved fraction = projection of the output change onto (source output − receiver output), over its
length²: 0 = no move, 1 = all the way. Mean over pairs and timesteps, 95&nbsp;% CI over pairs.</p>
<table><tr><th>level</th><th>target</th><th>moved fraction [95 % CI]</th></tr>{rows}</table>"""


def _rho(r: dict) -> str:
    if r.get("spearman") is None:
        return "—"
    ci = (
        ""
        if r.get("ci_low") is None or r["ci_low"] != r["ci_low"]
        else f" [{r['ci_low']:.2f}, {r['ci_high']:.2f}]"
    )
    return f"{r['spearman']:.3f}{ci}"


def _attribution_section(summary: dict) -> str:
    at = summary.get("attribution")
    if not at:
        return ""
    labels = {k: v["spec"] for k, v in summary["datasets"].items()}
    rows = []
    for r in at:
        ranking = r.get("ranking_vs_single_head")
        extra = (
            ""
            if not ranking
            else f"<br><span class='note'>ranking vs single heads: {_rho(ranking)}</span>"
        )
        top = r.get("top5_overlap", ranking.get("top5_overlap") if ranking else None)
        flag = "" if r.get("informative", True) else " <b>(uninformative)</b>"
        rows.append(
            f"<tr><td>{html.escape(r['estimator'])}</td><td>{html.escape(r['method'])}</td>"
            f"<td>{html.escape(labels.get(r['dataset'], r['dataset']))}</td><td>{r['timestep']}{flag}</td>"
            f"<td>{html.escape(str(r.get('compared_with')))} (ρ over {html.escape(str(r.get('spearman_over', '—')))})</td>"
            f"<td>{_rho(r)}{extra}</td><td>{'—' if top is None else f'{top}/5'}</td></tr>"
        )
    return f"""<h2>Attribution patching against the exhaustive ablation it estimates</h2>
<p class="note">Gradient estimates of ablation effects. First order (one forward and one backward per batch) and +gn
(first order plus the Gauss-Newton term ‖J·Δa‖²/P from 1 random output probe) estimate each head's single-head ablation:
Spearman ρ over heads against the exhaustive sweep. ig_joint (integrated gradients, 4 steps, all heads moved along one
path) splits the all-heads ablation among the heads: its per-image total is compared with the exhaustive all-heads
ablation (ρ over images); its head ranking against single heads is shown beneath, for what it is. 95&nbsp;% CIs:
percentile bootstrap over images.</p>
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
        return "–" + _flag(
            "no standard error: interval withheld" + (", underpowered" if r["primary"] else "")
        )
    text = f"{r['mde_ratio']:.3f}"
    return text + (
        _flag(f"underpowered: the paper's {paper} is below it")
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
            f"<td>{_fmt_num(r['value_a'])}</td><td>{_fmt_num(r['value_b'])}</td>"
            f"<td>{_interval(r['value'], r['ci_low'], r['ci_high'], r['ci_withheld'])}</td>"
            f"<td>{_p_cell(r['p_value'], r['p_floor'], r['can_reject'])}</td><td>{_mde_cell(r, paper)}</td></tr>"
        )
    return "".join(rows)


def _complexity_section(summary: dict, test_table: pd.DataFrame | None = None) -> str:
    measures = summary.get("complexity_measures", [])
    if not measures:
        return ""
    head = summary.get("complexity_ratio") or {}
    paper = head.get("paper_ratio", 1.084)
    rows = _complexity_rows(measures, head, paper)
    note = f"<p class='flag'>{html.escape(head['note'])}.</p>" if head.get("stand_in_for") else ""
    labels = {k: v["spec"] for k, v in summary["datasets"].items()}
    tests = summary.get("tests") or {"n_tests": 0, "families": {}}
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
effects: the effective number of heads whose removal matters. Smallest detectable ratio: exp(2.80·SE of log ratio),
the ratio a two-sided α = 0.05 test with this run's standard error finds with 80&nbsp;% power, beside the paper's
{paper}.{_datasets_ref(summary)}</p>{note}
<table><tr><th>measure</th><th>t</th><th>images a / b</th><th>{html.escape(labels["a"])}</th><th>{html.escape(labels["b"])}</th>
<th>ratio [95 % CI]</th><th>p</th><th>smallest detectable ratio</th></tr>{rows}</table>
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
            _flag(f"the paper's {r['paper_ratio']} could not have been detected")
            if e["underpowered"]
            else ""
        )
        lines.append(
            f"t = {e['timestep']}: {_interval(e['value'], e['ci_low'], e['ci_high'], e['ci_withheld'], 3)}, "
            f"p = {_p_cell(e['p_value'], e['p_floor'], e['can_reject'])}"
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
        low = _interval(
            lo["entropy_diff_nats"], lo["ci_low_nats"], lo["ci_high_nats"], lo["ci_withheld"], 3
        )
        high = _interval(
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


def _paper_section(summary: dict) -> str:
    """The paper's abstract, claim by claim, next to this run's measurement (CI, p, baseline)."""
    cmp = summary.get("paper_comparison")
    if not cmp:
        return ""
    paper, labels = cmp["paper"], {k: v["spec"] for k, v in summary["datasets"].items()}
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
number of keys (ln 64 = 4.16 nats is uniform attention over an 8×8 map), so the normalised entropy is given too.{_datasets_ref(summary)}{excluded}</p>
<table><tr><th>claim</th><th>paper</th><th>this run</th></tr>{body}</table>"""


def _ci(low, high) -> str:
    return "" if low is None else f" [{low:.3g}, {high:.3g}]"


def _interval_text(span, ci, resamples) -> str:
    """A 95 % interval where there is one, else the bare range of the replicates with their number."""
    if ci:
        return f" [{ci[0]:.3g}, {ci[1]:.3g}]"
    return "" if not span else f" (range {span[0]:.3g}–{span[1]:.3g} over {resamples} resamples)"


def _gap_text(w: dict) -> str:
    """The gap with its 95 % interval (none below MIN_UNITS_FOR_CI images) and its p-value."""
    g = w["gap"]
    if g["relative"] is None:  # the output metric: L_full = 0, the gap in its own units
        ci = "" if g["ci_low"] is None else f" [{g['ci_low']:.3g}, {g['ci_high']:.3g}]"
        return f"{g['mean']:.3g}{ci}; p = {g['p_value']:.2g}"
    full = w["loss_full"] / 100
    ci = "" if g["ci_low"] is None else f" [{g['ci_low'] / full:+.1f}, {g['ci_high'] / full:+.1f}]"
    return f"{g['mean'] / full:+.1f} %{ci}; p = {g['p_value']:.2g}"


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
                + f"<td colspan='6' style='text-align:left'>{html.escape(w['claim'])}</td></tr>"
            )
            continue
        o = w.get("overlap_with_other") or {}
        jac = (
            "–"
            if o.get("jaccard") is None
            else _fmt_num(o["jaccard"])
            + _interval_text(
                None if o.get("range_low") is None else [o["range_low"], o["range_high"]],
                None if o.get("ci_low") is None else [o["ci_low"], o["ci_high"]],
                o.get("resamples"),
            )
        )
        rows.append(
            head
            + f"<td>{w['size']}{_interval_text(w.get('size_range'), w.get('size_ci'), w.get('resamples'))}</td>"
            f"<td>{_fmt_num(w['faithfulness'])}</td><td>{_fmt_num(w['recovered_without_circuit'])}</td>"
            f"<td>{w['n_necessary']} of {w['size']}</td><td>{html.escape(jac)}</td>"
            f"<td style='text-align:left'>{html.escape(', '.join(w.get('unique', [])) or '–')}</td></tr>"
        )
    return "".join(rows)


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
            f"<td>{_fmt_num(k['ratio_b_over_a'])}{_interval_text(k['ratio_range'], k['ratio_ci'], k['resamples'])}</td>"
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


def _circuit_section(summary: dict, pngs: dict[str, str]) -> str:
    found = summary.get("circuits")
    if not found:
        return ""
    labels = {k: v["spec"] for k, v in summary["datasets"].items()}
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
(one-sided sign-flip permutation test over images, α = 0.05, uncorrected), otherwise the row says
"{html.escape(NO_CIRCUIT)}". A circuit keeps the loss within τ = {found["tau"]} of the gap: L_circuit − L_full ≤ τ ·
(L_empty − L_full), i.e. <b>faithfulness</b> = (L_empty − L_circuit)/(L_empty − L_full) ≥ {1 - found["tau"]:g}.
<b>Recovered without circuit</b> = (L_empty − L(circuit ablated))/(L_empty − L_full): the share of the gap the heads
outside the circuit recover on their own (near 0: the circuit carries everything; near 1: the rest can stand in for it).
<b>Necessary</b>: circuit heads whose ablation alone, on top of everything outside the circuit, breaks τ; where fewer
than all are necessary, the others matter only jointly (e.g. redundant copies). Gaps are in % of L_full with a 95 % bootstrap CI
over images. Sizes and the Jaccard overlap carry a 95 % percentile interval only from at least 200 bootstrap resamples
of the images (discovery rerun on each); with fewer, the range of the resamples is shown and labelled as such.{_datasets_ref(summary)}</p>
<table><tr><th>dataset</th><th>t</th><th>gap [95 % CI]; p</th><th>size</th><th>faithfulness</th>
<th>recovered without circuit</th><th>necessary</th><th>Jaccard</th><th>heads only here</th></tr>{_circuit_rows(found, labels)}</table>
{_circuit_complexity_rows(found)}
{figures}"""


_PROPERTY_NAMES = {
    "color_deviation": "colour deviation",
    "edge_energy": "edge energy",
    "texture_energy": "texture energy",
    "intensity_mean": "intensity mean",
    "intensity_sd": "intensity SD",
}


def _training_cell(entry: dict, key: str) -> str:
    value = entry.get(key)
    return "unknown" if value is None else str(value)


def _datasets_section(summary: dict) -> str:
    """What the two datasets differ in besides the contrast of interest, and what the model saw of them."""
    labels = {k: v["spec"] for k, v in summary["datasets"].items()}
    info = "".join(
        f"<tr><td>{k}</td><td>{html.escape(v['spec'])}</td><td>{v['n']}</td>"
        f"<td>{html.escape(v.get('rendering') or 'as loaded')}</td><td>{_training_cell(v, 'in_training_set')}</td>"
        f"<td>{_training_cell(v, 'intervened_in_training_set')}</td></tr>"
        for k, v in summary["datasets"].items()
    )
    rows = ""
    for d in summary.get("dataset_differences") or []:
        cells = [html.escape(_PROPERTY_NAMES.get(d["property"], d["property"]))]
        for key in ("a", "b"):
            v = summary["datasets"][key]["properties"][d["property"]]
            ci = "no CI" if v.get("ci_low") is None else f"{v['ci_low']:.4g}, {v['ci_high']:.4g}"
            cells.append(f"{v['mean']:.4g} [{ci}]")
        d_text = (
            "undefined (no variation)"
            if d["cohens_d"] is None
            else (
                f"{d['cohens_d']:+.2f}"
                + (
                    ""
                    if d["d_ci_low"] is None
                    else f" [{d['d_ci_low']:+.2f}, {d['d_ci_high']:+.2f}]"
                )
            )
        )
        q = "–" if d["p_corrected"] is None else f"{d['p_corrected']:.3g}"
        cells += [d_text, q, "yes" if d["differs"] else "no", html.escape(d["definition"])]
        rows += "<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"
    table = (
        ""
        if not rows
        else f"""<table><tr><th>property</th><th>{html.escape(labels["a"])} [95 % CI]</th>
<th>{html.escape(labels["b"])} [95 % CI]</th><th>Cohen's d, b − a [95 % CI]</th><th>q (BH)</th><th>differs</th><th>definition</th></tr>
{rows}</table>"""
    )
    return f"""<h2 id="datasets">What else differs between the datasets</h2>
<p class="note">Every synthetic-vs-natural difference below (divergence, complexity, circuits) may come from any difference
between the two image sets, not only from their content. Per image property: the mean over images with a 95&nbsp;%
percentile-bootstrap CI; Cohen's d of b − a (pooled SD) with a percentile-bootstrap CI (images resampled within each
dataset); q: permutation p (labels shuffled over images), Benjamini–Hochberg over the properties; "differs" at q &lt; 0.05.
|d| ≈ 0.2 is small, 0.8 large. The control contrast <code>--data-a nonfaces</code> (LFW's non-face patches against its
faces) shares source, format, size and preprocessing, so what differs there, these properties included, comes from what
the images show; the synthetic set differs in source and format too.</p>
{table}
<table><tr><th>dataset</th><th>spec</th><th>images</th><th>rendering</th><th>of them in the model's training set</th>
<th>of the intervened (ablate_n) in the training set</th></tr>{info}</table>
{_training_warning(summary)}
<p class="note">Mean ablation's reference: {html.escape(str(summary.get("mean_reference") or "in-sample"))}.
Training-set counts come from the model's <code>training_data.json</code>; "unknown" where it has none or the data is a
folder.</p>"""


def _training_warning(summary: dict) -> str:
    """A warning when the model was trained on analysed images (they are not held out)."""
    seen = [
        (v["spec"], v["in_training_set"], v["n"])
        for v in summary["datasets"].values()
        if v.get("in_training_set")
    ]
    if not seen:
        return ""
    parts = ", ".join(f"{k} of the {n} {html.escape(spec)} images" for spec, k, n in seen)
    return (
        f"<p><b>Not held out:</b> the model was trained on {parts}; for them, denoising, ablation and circuit "
        "results describe images the model has seen, so a difference from held-out images may be memorisation.</p>"
    )


def _datasets_ref(summary: dict) -> str:
    """One sentence pointing a synthetic-vs-natural claim at the dataset differences that could explain it."""
    differing = [d for d in summary.get("dataset_differences") or [] if d["differs"]]
    if summary.get("dataset_differences") is None:
        return ""
    if not differing:
        return (
            " The datasets differ significantly in none of the measured image properties "
            "(<a href='#datasets'>What else differs between the datasets</a>)."
        )
    listed = ", ".join(
        f"{_PROPERTY_NAMES.get(d['property'], d['property'])} (d = {d['cohens_d']:+.2f})"
        for d in differing
    )
    return (
        f" Besides their content, the datasets differ in {html.escape(listed)}: any difference here may come from those "
        "(<a href='#datasets'>What else differs between the datasets</a>)."
    )


def _fmt_num(x) -> str:
    return "–" if x is None else f"{x:.3g}"


def _seed_section(summary: dict) -> str:
    sv = summary.get("seed_variance")
    if not sv:
        return ""
    labels = {k: v["spec"] for k, v in summary["datasets"].items()} | {
        "a|b": "a vs b",
        "b-a": "b − a",
    }
    rows = "".join(
        f"<tr><td>{html.escape(r['quantity'])}</td><td>{html.escape(labels.get(r['dataset'], r['dataset']))}</td>"
        f"<td>{r['timestep']}</td><td>{r['mean']:.4f}</td><td>{r['sd']:.4f}</td><td>{r['min']:.4f} – {r['max']:.4f}</td></tr>"
        for r in sv
    )
    return f"""<h3>Seed variance</h3>
<p class="note">The same images under {len(sv[0]["seeds"])} noise seeds ({", ".join(map(str, sv[0]["seeds"]))}).</p>
<table><tr><th>quantity</th><th>dataset</th><th>t</th><th>mean</th><th>sd</th><th>range</th></tr>{rows}</table>"""


def _cost_section(cost: dict | None) -> str:
    """What the run cost per stage (the manifest's ``cost``): forwards, images through them, seconds."""
    if not cost:
        return ""
    rows = "".join(
        f"<tr><td>{html.escape(label)}</td><td>{c['forward_calls']:,}</td><td>{c['image_forwards']:,}</td>"
        f"<td>{c['seconds']:.1f}</td><td>{c.get('shards', '–')}</td></tr>"
        for label, c in cost.items()
    )
    return f"""<h3>Appendix: what this run cost</h3>
<p class="note">Per stage: forward calls through the network (a partial forward of prefix reuse counts as one), the
images they carried, and seconds of computing, summed over the stage's shards (a shard resumed from disk counts as
measured when it was computed); manifest.json → cost.</p>
<table><tr><th>stage</th><th>forward calls</th><th>image forwards</th><th>seconds</th><th>shards</th></tr>{rows}</table>"""


def _model_note(model: dict) -> str:
    """What the model was fed and how its errors are measured, where that is not a plain pixel-space DDPM."""
    notes = []
    if model.get("conditioning"):
        notes.append(f"Conditioning: {model['conditioning']}.")
    if model.get("process") == "flow-matching":
        notes.append(
            "A flow-matching (velocity) model, read exactly as its equivalent ε-predicting DDPM: timestep t "
            "is the scheduler's σ grid, ε and x₀ are those its velocity implies."
        )
    latent = model.get("latent")
    if latent:
        notes.append(
            f"A latent model: images of {latent['image_size']} px were encoded by its {latent['autoencoder']} "
            f"(posterior mean, scale {latent['scaling_factor']:g}, shift {latent['shift_factor']:g}); ε- and "
            "x₀-errors are in latent units, attention probes look at the pixels."
        )
    return "".join(f" {html.escape(n)}" for n in notes)


def _layer_rows(summary: dict) -> str:
    rows = []
    for e in summary["entropy_by_layer"]:
        spec = summary["datasets"][e["dataset"]]["spec"]
        rows.append(
            f"<tr><td>{html.escape(spec)}</td><td>{e['timestep']}</td><td>{html.escape(e['layer'])}</td>"
            f"<td>{e['n_keys']}</td><td>{e['entropy_nats']:.3f}</td><td>{e['uniform_nats']:.3f}</td>"
            f"<td>{e['entropy_norm']:.3f}</td></tr>"
        )
    return "\n".join(rows)


# the page's skeleton: str.format fields for the sections (CSS braces doubled), ``{{toc}}`` filled last
_PAGE = (Path(__file__).parent / "report.html").read_text(encoding="utf-8")


def write_report(
    run_dir: Path,
    summary: dict,
    heads: pd.DataFrame,
    roles: pd.DataFrame,
    ablations: pd.DataFrame | None = None,
    circuits: list[dict] | None = None,
    curves: pd.DataFrame | None = None,
    gallery: tuple[pd.DataFrame, pd.DataFrame] | None = None,
    tests: pd.DataFrame | None = None,
    token_heatmaps: pd.DataFrame | None = None,
    cost: dict | None = None,
    attribution: pd.DataFrame | None = None,
    patching: pd.DataFrame | None = None,
) -> Path:
    """Write the figures (``figures/*.png``) and ``report.html`` into ``run_dir``."""
    labels = {k: v["spec"] for k, v in summary["datasets"].items()}
    figures = {
        "entropy_heatmap": entropy_heatmap(heads, labels),
        "role_map": role_map(roles, labels),
        "divergence": divergence_plot(summary["entropy_divergence"]),
    }
    if ablations is not None:
        figures["ablation_heads"] = ablation_bars(ablations)
    if attribution is not None and ablations is not None and len(attribution):
        figures["attribution_scatter"] = attribution_scatter(attribution, ablations)
    if patching is not None and (patching.level == "head").any():
        figures["patching"] = patching_grid(patching)
    if gallery is not None and len(gallery[0]):  # no maps when no head has a square query grid
        figures["attention_gallery"] = attention_gallery(*gallery, labels)
    if gallery is not None and token_heatmaps is not None and len(token_heatmaps):
        figures["token_maps"] = token_heatmap_figure(token_heatmaps, gallery[1], labels)
    if circuits:
        figures["circuits"] = circuit_map(
            [c | {"label": labels.get(c["dataset"], c["dataset"])} for c in circuits], roles
        )
    if circuits:  # windows without a claimed circuit get a panel that says so
        figures["circuit_curves"] = circuit_curves_plot(
            curves if curves is not None else pd.DataFrame(), labels, circuits
        )
    pngs = {}
    for name, fig in figures.items():
        pngs[name] = png_bytes(fig)
        atomic_write_bytes(run_dir / "figures" / f"{name}.png", pngs[name])
    b64 = {name: base64.b64encode(data).decode() for name, data in pngs.items()}
    page = _PAGE.format(
        role_rows=_role_rows(summary),
        role_evidence=_role_evidence_section(summary),
        role_png=b64["role_map"],
        divergence_section=_divergence_section(summary, b64["divergence"]),
        ablation_section=_ablation_section(summary, b64.get("ablation_heads")),
        patching_section=_patching_section(summary),
        attribution_section=_attribution_section(summary),
        complexity_section=_complexity_section(summary, tests),
        seed_section=_seed_section(summary),
        circuit_section=_circuit_section(summary, b64),
        paper_section=_paper_section(summary),
        validity_section=validity_section(summary),
        datasets_section=_datasets_section(summary),
        datasets_ref=_datasets_ref(summary),
        gallery_section=(
            ""
            if "attention_gallery" not in b64
            else (
                "<h2>Attention maps</h2><p class='note'>The two most focal heads (lowest normalised entropy) and the two whose "
                "single-head zero ablation costs most, on the first images of each dataset: where each looks from one query "
                "position (tables/gallery.parquet).</p>"
                f'<img alt="attention map gallery" src="data:image/png;base64,{b64["attention_gallery"]}" style="max-width:100%">'
            )
        )
        + (
            ""
            if "token_maps" not in b64
            else "<h2>Prompt token maps</h2><p class='note'>DAAM-style: where the image attends to each prompt token, "
            "averaged over every cross- (or joint-) attention head and timestep (tables/token_heatmaps.parquet; per head "
            "and timestep in tables/token_maps.parquet).</p>"
            f'<img alt="prompt token maps" src="data:image/png;base64,{b64["token_maps"]}" style="max-width:100%">'
        ),
        model=html.escape(summary["model"]["source"]),
        model_note=_model_note(summary["model"]),
        heads=summary["model"]["heads"],
        layers=summary["model"]["layers"],
        seed=html.escape(str(summary.get("seed", ""))),
        headline=_headline_rows(summary),
        heatmap=b64["entropy_heatmap"],
        layer_rows=_layer_rows(summary),
        cost_section=_cost_section(cost),
        pending_note=(
            ""
            if not summary["pending"]
            else "<p class='note'>Not computed in this run (not selected, or not "
            f"applicable): {html.escape(', '.join(summary['pending']))}.</p>"
        ),
        key_findings=key_findings_section(summary),
        head_pages=head_pages(summary, heads, roles, ablations, circuits, gallery),
        patching_figure=_figure(b64, "patching", "moved fraction of every head, per timestep"),
        attribution_figure=_figure(
            b64, "attribution_scatter", "attribution estimates against the exhaustive sweep"
        ),
    )
    page = _tidy(_with_contents(page))
    path = run_dir / "report.html"
    atomic_write_bytes(path, page.encode())
    return path


def _figure(b64: dict, name: str, alt: str) -> str:
    return (
        ""
        if name not in b64
        else f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{b64[name]}" style="max-width:100%">'
    )


def _slug(text: str) -> str:
    import re

    return re.sub(r"[^a-z0-9]+", "-", re.sub(r"<[^>]+>", "", text).lower()).strip("-") or "section"


def _with_contents(page: str) -> str:
    """Every h2 gets an id (its text as a slug, unless it has one) and the page a table of contents linking to them."""
    import re

    entries, seen = [], set()

    def anchor(m) -> str:
        attrs, text = m.group(1) or "", m.group(2)
        found = re.search(r"id=['\"]([^'\"]+)['\"]", attrs)
        ident = found.group(1) if found else _slug(text)
        while ident in seen:
            ident += "-2"
        seen.add(ident)
        entries.append((ident, re.sub(r"<[^>]+>", "", text)))
        return f"<h2 id='{ident}'>{text}</h2>" if not found else m.group(0)

    page = re.sub(r"<h2([^>]*)>(.*?)</h2>", anchor, page)
    toc = "".join(f"<li><a href='#{i}'>{t}</a></li>" for i, t in entries)
    return page.replace("{toc}", f"<nav id='contents'><h3>Contents</h3><ol>{toc}</ol></nav>", 1)


_PLURALS = (
    "head",
    "image",
    "set",
    "layer",
    "pair",
    "test",
    "resample",
    "timestep",
    "shard",
    "circuit",
    "claim",
)


def _tidy(page: str) -> str:
    """Typography the templates cannot see: no negative zero ("-0.000"), no "1 heads"."""
    import re

    page = re.sub(r"(?<![\w.])[-−]0(\.0+)?(?!\d|\.\d)", r"0\1", page)
    return re.sub(rf"(?<![\d.,])1 ({'|'.join(_PLURALS)})s\b", r"1 \1", page)
