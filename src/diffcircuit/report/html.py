"""``report.html``: a self-contained page (figures embedded) rebuilt from a run directory's files."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from diffcircuit.protocol.circuits import CircuitRecord
from diffcircuit.protocol.store import atomic_write_bytes
from diffcircuit.report.cells import (
    PROPERTY_NAMES,
    datasets_ref,
    flagged,
    fmt_entry,
    interval_cell,
    p_cell,
)
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
from diffcircuit.report.result import Summary
from diffcircuit.report.sections import (
    ablation_section,
    attribution_section,
    circuit_section,
    complexity_section,
    paper_section,
    patching_section,
)
from diffcircuit.report.validity import key_findings_section, validity_section

__all__ = ["write_report"]


def _headline_rows(summary: Summary) -> str:
    entropy = {(e["dataset"], e["timestep"]): e["entropy_norm"] for e in summary.entropy}
    rows = []
    for d in summary.denoising:
        key = (d["dataset"], d["timestep"])
        rows.append(
            "<tr>"
            + "".join(
                f"<td>{html.escape(str(v))}</td>"
                for v in (
                    summary.datasets[d["dataset"]]["spec"],
                    d["timestep"],
                    fmt_entry(d["eps_mse"]),
                    fmt_entry(d["eps_mse_trivial"]),
                    fmt_entry(d["x0_mse"]),
                    fmt_entry(d["x0_mse_trivial"]),
                    fmt_entry(entropy[key]),
                )
            )
            + f"<td>{_informative_cell(d)}</td></tr>"
        )
    return "\n".join(rows)


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


def _divergence_rows(summary: Summary) -> str:
    rows = []
    excluded = set((summary.paper_comparison or {}).get("excluded_timesteps", []))
    for d in summary.entropy_divergence:
        t = str(d["timestep"]) + (
            flagged("uninformative: not a headline claim") if int(d["timestep"]) in excluded else ""
        )
        differ = f"{d['n_heads_differ']} / {d['n_heads']}" + (
            "" if d["heads_can_reject"] else flagged("no single head can reach q < 0.05 at this n")
        )
        rows.append(
            f"<tr><td>{t}</td><td>{d['n_a']} / {d['n_b']}</td>"
            f"<td>{interval_cell(d['entropy_diff_nats'], d['ci_low_nats'], d['ci_high_nats'], d['ci_withheld'])}</td>"
            f"<td>{interval_cell(d['entropy_diff_norm'], d['ci_low_norm'], d['ci_high_norm'], d['ci_withheld'])}</td>"
            f"<td>{p_cell(d['p_value'], d['p_floor'], d['can_reject'])}</td><td>{differ}</td>"
            f"<td>{d['wasserstein_nats']:.4f}</td><td>{d['wasserstein_null_mean_nats']:.4f}</td>"
            f"<td>{d['wasserstein_excess_nats']:.4f}</td>"
            f"<td>{p_cell(d['wasserstein_p'], d['wasserstein_p_floor'], d['wasserstein_can_reject'])}</td>"
            f"<td>{d['legacy_jsd_bits_10bins']:.3f}</td></tr>"
        )
    return "\n".join(rows)


def _differing_heads(summary: Summary) -> str:
    parts = []
    for e in summary.entropy_difference_heads or []:
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


def _divergence_section(summary: Summary, png: str) -> str:
    div = summary.entropy_divergence
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
and n; it is shown for comparison with older runs only.{datasets_ref(summary)}</p>
<table><tr><th>t</th><th>images a / b</th><th>entropy b − a, nats [95 % CI]</th><th>normalised [95 % CI]</th><th>p</th>
<th>heads that differ</th><th>W1 (nats)</th><th>null mean</th><th>excess</th><th>p (W1)</th><th>legacy JSD</th></tr>
{_divergence_rows(summary)}
</table>
{_differing_heads(summary)}
<img alt="entropy difference and null-corrected divergence across timesteps" src="data:image/png;base64,{png}" style="max-width:90%">"""


def _role_rows(summary: Summary) -> str:
    labels = {k: v["spec"] for k, v in summary.datasets.items()}
    keep = summary.informative
    rows = []
    for r in summary.roles:
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
            + (flagged("uninformative timestep: not a headline claim") if uninformative else ""),
            str(r["timestep"]),
            str(r["n_heads"]),
            f"{fmt_entry(d['entropy_nats'])} (uniform {d['uniform_nats']:.2f}; "
            f"norm. {d['entropy_norm']['mean']:.3f})",
            evidence,
            html.escape(r["definition"]),
        ]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return "\n".join(rows)


def _role_evidence_section(summary: Summary) -> str:
    labels = {k: v["spec"] for k, v in summary.datasets.items()}
    rows = []
    for e in summary.role_evidence or []:
        cells = [html.escape(labels.get(e["dataset"], e["dataset"])), str(e["timestep"])]
        cells += [
            f"{c['labelled']} / {c['significant']} / {c['raw_only']}" for c in e["probes"].values()
        ]
        cells.append(str(e["n_positional"]))
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    if not rows:
        return ""
    probes = list(summary.role_evidence[0]["probes"])
    differ = summary.role_differences or []
    diff_rows = "".join(
        f"<tr><td>{d['timestep']}</td><td>{html.escape(d['head'])}</td><td>{html.escape(d['a'])}</td>"
        f"<td>{html.escape(d['b'])}</td></tr>"
        for d in differ
    )
    return (
        "<h3>Content roles against their null</h3><p class='note'>Per probe: heads it labels / heads whose "
        "excess over the null (the same head scored on the other images' features) is significant / heads whose "
        "raw affinity passes the raw threshold but not the null (<i>positional</i> when no geometric role applies "
        "and the excess is below log 1.1 with 95 % confidence: the score is explained by where the head looks; "
        "otherwise the test is inconclusive and the head unassigned).</p><table><tr><th>dataset</th><th>t</th>"
        + "".join(f"<th>{html.escape(p)}</th>" for p in probes)
        + "<th>positional</th></tr>"
        + "\n".join(rows)
        + "</table>"
        + (
            f"<h3>Heads labelled differently on the two datasets</h3><p class='note'>{len(differ)} head × "
            "timestep pairs. Descriptive, not a test: a label on one dataset and none (or another) on the other "
            "is not evidence that the head behaves differently on them — each label is tested against its own "
            "null, and no test compares the datasets here (a significant result on one and a non-significant "
            "one on the other is not a significant difference).</p><table><tr><th>t</th><th>head</th><th>"
            + html.escape(labels.get("a", "a"))
            + "</th><th>"
            + html.escape(labels.get("b", "b"))
            + "</th></tr>"
            + diff_rows
            + "</table>"
            if differ
            else "<p class='note'>Both datasets give every head the same role label.</p>"
        )
    )


def _training_cell(entry: dict, key: str) -> str:
    value = entry.get(key)
    return "unknown" if value is None else str(value)


def _datasets_section(summary: Summary) -> str:
    """What the two datasets differ in besides the contrast of interest, and what the model saw of them."""
    labels = {k: v["spec"] for k, v in summary.datasets.items()}
    info = "".join(
        f"<tr><td>{k}</td><td>{html.escape(v['spec'])}</td><td>{v['n']}</td>"
        f"<td>{html.escape(v.get('rendering') or 'as loaded')}</td><td>{_training_cell(v, 'in_training_set')}</td>"
        f"<td>{_training_cell(v, 'intervened_in_training_set')}</td></tr>"
        for k, v in summary.datasets.items()
    )
    rows = ""
    for d in summary.dataset_differences or []:
        cells = [html.escape(PROPERTY_NAMES.get(d["property"], d["property"]))]
        for key in ("a", "b"):
            v = summary.datasets[key]["properties"][d["property"]]
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
<p class="note">Mean ablation's reference: {html.escape(str(summary.mean_reference or "in-sample"))}.
Training-set counts come from the model's <code>training_data.json</code>; "unknown" where it has none or the data is a
folder.</p>"""


def _training_warning(summary: Summary) -> str:
    """A warning when the model was trained on analysed images (they are not held out)."""
    seen = [
        (v["spec"], v["in_training_set"], v["n"])
        for v in summary.datasets.values()
        if v.get("in_training_set")
    ]
    if not seen:
        return ""
    parts = ", ".join(f"{k} of the {n} {html.escape(spec)} images" for spec, k, n in seen)
    return (
        f"<p><b>Not held out:</b> the model was trained on {parts}; for them, denoising, ablation and circuit "
        "results describe images the model has seen, so a difference from held-out images may be memorisation.</p>"
    )


def _seed_section(summary: Summary) -> str:
    sv = summary.seed_variance
    if not sv:
        return ""
    labels = {k: v["spec"] for k, v in summary.datasets.items()} | {
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


def _layer_rows(summary: Summary) -> str:
    rows = []
    for e in summary.entropy_by_layer:
        spec = summary.datasets[e["dataset"]]["spec"]
        rows.append(
            f"<tr><td>{html.escape(spec)}</td><td>{e['timestep']}</td><td>{html.escape(e['layer'])}</td>"
            f"<td>{e['n_keys']}</td><td>{e['entropy_nats']:.3f}</td><td>{e['uniform_nats']:.3f}</td>"
            f"<td>{e['entropy_norm']:.3f}</td></tr>"
        )
    return "\n".join(rows)


# the page's skeleton: str.format fields for the sections (CSS braces doubled), ``{{toc}}`` filled last
_PAGE = (Path(__file__).parent / "report.html").read_text(encoding="utf-8")


def _pending_note(pending: list[str]) -> str:
    """The analyses this run did not compute, in one note; nothing when it computed them all."""
    if not pending:
        return ""
    return (
        "<p class='note'>Not computed in this run (not selected, or not applicable): "
        f"{html.escape(', '.join(pending))}.</p>"
    )


def write_report(
    run_dir: Path,
    summary: Summary,
    heads: pd.DataFrame,
    roles: pd.DataFrame,
    ablations: pd.DataFrame | None = None,
    circuits: Sequence[CircuitRecord] | None = None,
    curves: pd.DataFrame | None = None,
    gallery: tuple[pd.DataFrame, pd.DataFrame] | None = None,
    tests: pd.DataFrame | None = None,
    token_heatmaps: pd.DataFrame | None = None,
    cost: dict | None = None,
    attribution: pd.DataFrame | None = None,
    patching: pd.DataFrame | None = None,
    config: dict | None = None,
) -> Path:
    """Write the figures (``figures/*.png``) and ``report.html`` into ``run_dir``; ``config`` is the run's
    (``manifest.json``'s), for the reason an analysis is missing."""
    labels = {k: v["spec"] for k, v in summary.datasets.items()}
    figures = {
        "entropy_heatmap": entropy_heatmap(heads, labels),
        "role_map": role_map(roles, labels),
        "divergence": divergence_plot(summary.entropy_divergence),
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
        figures["circuits"] = circuit_map(circuits, roles, labels)
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
        ablation_section=ablation_section(summary, b64.get("ablation_heads"), config),
        patching_section=patching_section(summary),
        attribution_section=attribution_section(summary),
        complexity_section=complexity_section(summary, tests),
        seed_section=_seed_section(summary),
        circuit_section=circuit_section(summary, b64),
        paper_section=paper_section(summary),
        validity_section=validity_section(summary),
        datasets_section=_datasets_section(summary),
        datasets_ref=datasets_ref(summary),
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
        model=html.escape(summary.model["source"]),
        model_note=_model_note(summary.model),
        heads=summary.model["heads"],
        layers=summary.model["layers"],
        seed=html.escape(str(summary.seed)),
        headline=_headline_rows(summary),
        heatmap=b64["entropy_heatmap"],
        layer_rows=_layer_rows(summary),
        cost_section=_cost_section(cost),
        pending_note=_pending_note(summary.pending),
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
