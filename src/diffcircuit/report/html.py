"""``report.html``: a self-contained page (figures embedded) rebuilt from a run directory's files."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np
import pandas as pd

from diffcircuit.protocol.store import atomic_write_bytes

__all__ = ["ablation_bars", "attention_gallery", "token_heatmap_figure", "circuit_curves_plot", "circuit_map", "divergence_plot", "entropy_heatmap", "role_map",
           "save_figure", "write_report"]


def entropy_heatmap(heads: pd.DataFrame, labels: dict[str, str]):
    """Normalised entropy, heads (rows, grouped by layer) x timesteps, one panel per dataset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = heads.groupby(["dataset", "layer", "head", "timestep"], sort=False)["entropy_norm"].mean()
    datasets = list(dict.fromkeys(heads["dataset"]))
    fig, axes = plt.subplots(1, len(datasets), figsize=(3.2 * len(datasets) + 1, 9), squeeze=False)
    for ax, ds in zip(axes[0], datasets):
        grid = table.loc[ds].unstack("timestep")  # rows: (layer, head), columns: timesteps
        im = ax.imshow(grid.to_numpy(), aspect="auto", vmin=0, vmax=1, cmap="viridis", interpolation="nearest")
        ax.set_title(labels.get(ds, ds), fontsize=9)
        ax.set_xticks(range(grid.shape[1]), [str(t) for t in grid.columns])
        ax.set_xlabel("timestep")
        layers = grid.index.get_level_values(0)
        starts = [i for i in range(len(layers)) if i == 0 or layers[i] != layers[i - 1]]
        ax.set_yticks(starts, [layers[i] for i in starts], fontsize=6)
        for s in starts[1:]:
            ax.axhline(s - 0.5, color="white", lw=0.6)
    fig.colorbar(im, ax=axes[0].tolist(), label="entropy / ln(n_keys)  (1 = uniform)")
    return fig


def _role_colours():
    import matplotlib.pyplot as plt

    from diffcircuit.metrics.roles import ROLES

    names = [*ROLES, "unassigned"]
    tab10 = plt.get_cmap("tab10").colors
    colours = tuple(tab10[i] for i in (0, 1, 2, 3, 4, 5, 6, 8)) + ((0.88, 0.88, 0.88),)  # no tab10 grey: light grey is 'unassigned'
    return names, colours


def _role_legend(fig, names, colours, *, bottom: float) -> None:
    import matplotlib.pyplot as plt

    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colours]
    fig.legend(handles, names, loc="lower center", ncol=len(names), fontsize=7, frameon=False)
    fig.subplots_adjust(bottom=bottom)


def role_map(roles: pd.DataFrame):
    """Each head's role, layers x heads, one panel per timestep."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    names, colours = _role_colours()
    timesteps = sorted(roles.timestep.unique())
    layers = list(dict.fromkeys(roles.layer))
    width = int(roles["head"].max()) + 1
    fig, axes = plt.subplots(1, len(timesteps), figsize=(2.6 * len(timesteps) + 2, 0.35 * len(layers) + 1.5), squeeze=False)
    for ax, t in zip(axes[0], timesteps):
        grid = np.full((len(layers), width), np.nan)
        for row in roles[roles.timestep == t].itertuples():
            grid[layers.index(row.layer), row.head] = names.index(row.role)
        ax.imshow(grid, cmap=ListedColormap(colours), vmin=-0.5, vmax=len(names) - 0.5, aspect="auto")
        ax.set_title(f"t = {t}", fontsize=9)
        ax.set_yticks(range(len(layers)), layers if ax is axes[0][0] else [], fontsize=6)
        ax.set_xticks(range(0, width, 2))
        ax.set_xlabel("head")
    _role_legend(fig, names, colours, bottom=0.25)
    return fig


def circuit_map(circuits: list[dict], roles: pd.DataFrame):
    """Each primary-τ circuit on the layer x head grid: circuit heads filled with their role's colour
    at that timestep (black edge), the rest hollow; one panel per dataset x window."""
    import matplotlib.pyplot as plt

    names, colours = _role_colours()
    layers = list(dict.fromkeys(roles.layer))
    width = int(roles["head"].max()) + 1
    role_of = {(r.timestep, r.layer, int(r.head)): r.role for r in roles.itertuples()}
    fig, axes = plt.subplots(1, len(circuits), figsize=(2.4 * len(circuits) + 2, 0.35 * len(layers) + 1.8),
                             squeeze=False, sharey=True)
    for ax, c in zip(axes[0], circuits):
        t = c["timesteps"][0]  # a window's heads take their roles at its first timestep
        heads = {tuple(h.rsplit(":", 1)) for h in c["heads"]}
        for row in roles[roles.timestep == t].itertuples():
            y, x = layers.index(row.layer), int(row.head)
            inside = (row.layer, str(x)) in heads
            colour = colours[names.index(role_of.get((t, row.layer, x), "unassigned"))]
            ax.add_patch(plt.Rectangle((x - 0.42, y - 0.42), 0.84, 0.84, facecolor=colour if inside else "none",
                                       edgecolor="black" if inside else (0.85, 0.85, 0.85), lw=1.2 if inside else 0.6))
        ax.set_xlim(-0.6, width - 0.4)
        ax.set_ylim(len(layers) - 0.5, -0.5)
        ax.set_title(f"{c.get('label', c['dataset'])}, t = {c['window']}\n{len(c['heads'])} heads (τ = {c['tau']})", fontsize=8)
        ax.set_yticks(range(len(layers)), layers, fontsize=6)
        ax.set_xticks(range(0, width, 2))
        ax.set_xlabel("head")
    _role_legend(fig, names, colours, bottom=0.28)
    return fig


def circuit_curves_plot(curves: pd.DataFrame, labels: dict[str, str]):
    """Faithfulness and completeness of the top-k heads against k, one panel per timestep window."""
    import matplotlib.pyplot as plt

    windows = list(dict.fromkeys(curves.window))
    fig, axes = plt.subplots(1, len(windows), figsize=(3.4 * len(windows), 3), squeeze=False, sharey=True)
    for ax, t in zip(axes[0], windows):
        for i, (ds, g) in enumerate(curves[curves.window == t].groupby("dataset", sort=True)):
            g = g.sort_values("size")
            ax.plot(g["size"], g.faithfulness, "-o", ms=3, color=f"C{i}", label=f"{labels.get(ds, ds)}: faithfulness")
            ax.plot(g["size"], g.completeness, "--", color=f"C{i}", label=f"{labels.get(ds, ds)}: completeness")
        ax.axhline(1, color="k", lw=0.5)
        ax.axhline(0, color="k", lw=0.5)
        ax.set_xscale("symlog", linthresh=2, linscale=0.5)
        ticks = [k for k in (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512) if k <= curves["size"].max()]
        ax.set_xticks(ticks, [str(k) for k in ticks])
        ax.minorticks_off()
        ax.set_xlim(left=0)
        ax.set_title(f"t = {t}", fontsize=9)
        ax.set_xlabel("circuit size k (top-k heads)")
    axes[0][0].set_ylabel("loss recovered")
    axes[0][-1].legend(fontsize=7)
    return fig


def _show_picture(ax, pic, label: str) -> np.ndarray:
    """Draw a gallery picture (pixels in [-1, 1]) with its label; returns its grey version for overlays."""
    img = ((np.asarray(pic.pixels).reshape(pic.channels, pic.size, pic.size).transpose(1, 2, 0) + 1) / 2).clip(0, 1)
    grey = img.mean(-1)
    ax.imshow(img if pic.channels == 3 else grey, cmap="gray", vmin=0, vmax=1)
    ax.set_ylabel(label, fontsize=7)
    return grey


def attention_gallery(maps: pd.DataFrame, pictures: pd.DataFrame, labels: dict[str, str]):
    """Rows: images of each dataset; columns: heads. The head's attention from the query (red dot),
    upsampled to the image and overlaid on it."""
    import matplotlib.pyplot as plt

    heads = list(dict.fromkeys(zip(maps.layer, maps["head"])))
    rows = list(dict.fromkeys(zip(maps.dataset, maps.image)))
    fig, axes = plt.subplots(len(rows), len(heads) + 1, figsize=(1.7 * (len(heads) + 1), 1.75 * len(rows)), squeeze=False)
    pics = {(r.dataset, r.image): r for r in pictures.itertuples()}
    for i, (ds, image) in enumerate(rows):
        pic = pics[(ds, image)]
        grey = _show_picture(axes[i][0], pic, f"{labels.get(ds, ds)} {image}")
        for j, (layer, head) in enumerate(heads, start=1):
            row = maps[(maps.dataset == ds) & (maps.image == image) & (maps.layer == layer) & (maps["head"] == head)].iloc[0]
            grid = np.asarray(row["map"]).reshape(row.grid, row.grid)
            scale = pic.size // row.grid
            ax = axes[i][j]
            ax.imshow(grey, cmap="gray", vmin=0, vmax=1)
            ax.imshow(np.kron(grid / grid.max(), np.ones((scale, scale))), cmap="magma", alpha=0.6, vmin=0, vmax=1)
            ax.plot((row.query_x + 0.5) * scale - 0.5, (row.query_y + 0.5) * scale - 0.5, "o", ms=3, color="red")
            if i == 0:
                ax.set_title(f"{layer.replace('.attentions.', '.attn.')}:{head}", fontsize=6)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0][0].set_title("image", fontsize=7)
    t = int(maps.timestep.iloc[0])
    fig.suptitle(f"attention from the red query (object centre on synthetic images, else the centre), t = {t}", fontsize=8)
    fig.tight_layout()
    return fig


def token_heatmap_figure(heatmaps: pd.DataFrame, pictures: pd.DataFrame, labels: dict[str, str]):
    """Rows: the first image of each dataset; columns: the prompt's tokens. Each token's DAAM heat map
    (mean over cross-attention layers, heads and timesteps) overlaid on the image, on a shared scale."""
    import matplotlib.pyplot as plt

    first = heatmaps.groupby("dataset").image.min()
    shown = heatmaps[heatmaps.image == heatmaps.dataset.map(first)]
    tokens = list(dict.fromkeys(zip(shown.token, shown.text)))
    rows = list(first.items())
    fig, axes = plt.subplots(len(rows), len(tokens) + 1, figsize=(1.6 * (len(tokens) + 1), 1.7 * len(rows)), squeeze=False)
    pics = {(r.dataset, r.image): r for r in pictures.itertuples()}
    top = float(np.max(np.stack(shown.heatmap.to_numpy())))
    for i, (ds, image) in enumerate(rows):
        pic = pics[(ds, image)]
        grey = _show_picture(axes[i][0], pic, f"{labels.get(ds, ds)} {image}")
        for j, (token, text) in enumerate(tokens, start=1):
            row = shown[(shown.dataset == ds) & (shown.token == token)].iloc[0]
            axes[i][j].imshow(grey, cmap="gray", vmin=0, vmax=1)
            axes[i][j].imshow(np.asarray(row["heatmap"]).reshape(int(row["size"]), int(row["size"])), cmap="magma", alpha=0.6, vmin=0, vmax=top)
            if i == 0:
                axes[i][j].set_title(text, fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"attention to each prompt token (0 to {top:.2f}), mean over cross-attention heads and timesteps",
                 fontsize=8)
    fig.tight_layout()
    return fig


def divergence_plot(divergence: list[dict]):
    import matplotlib.pyplot as plt

    t = [d["timestep"] for d in divergence]
    corrected = np.array([d["bias_corrected"] for d in divergence])
    low, high = np.array([d["ci_low"] for d in divergence]), np.array([d["ci_high"] for d in divergence])
    fig, ax = plt.subplots(figsize=(5, 3.2))
    yerr = [np.clip(corrected - low, 0, None), np.clip(high - corrected, 0, None)]
    ax.errorbar(t, corrected, yerr=yerr, marker="o", capsize=3, label="bias-corrected (95 % CI)")
    ax.plot(t, [d["value"] for d in divergence], "x", color="C1", label="plug-in estimate")
    ax.plot(t, [d["null_value"] for d in divergence], "k--", lw=1, label="label-permutation null")
    ax.set_xlabel("timestep")
    ax.set_ylabel("mean JSD of head entropies (bits)")
    ax.legend(fontsize=8)
    return fig


def ablation_bars(ablations: pd.DataFrame):
    """Mean degradation (%) per ablation, one row per method: every single head (data-flow order, coloured by
    layer; grey band: the middle 95 % of single heads), then every layer and block with the null band of
    random head sets of the same size (2.5–97.5 percentiles of their mean degradations)."""
    import matplotlib.pyplot as plt

    methods = sorted(ablations[ablations.level == "head"].method.unique())
    heads = ablations[ablations.level == "head"]
    order = list(dict.fromkeys(heads.target))
    components = ablations[ablations.level.isin(["layer", "block"])]
    comp_order = list(dict.fromkeys(components.target))
    random = ablations[ablations.level == "random"]
    fig, axes = plt.subplots(len(methods), 2, figsize=(14, 2.6 * len(methods) + 0.8), squeeze=False,
                             gridspec_kw={"width_ratios": [3, 1]})
    for row, method in enumerate(methods):
        ax = axes[row, 0]
        means = heads[heads.method == method].groupby("target")["degradation_pct"].mean().reindex(order)
        layers = [t.rsplit(":", 1)[0] for t in order]
        colours = [f"C{list(dict.fromkeys(layers)).index(layer) % 10}" for layer in layers]
        low, high = np.nanpercentile(means.to_numpy(), [2.5, 97.5])
        ax.axhspan(low, high, color="0.85", zorder=0, label="middle 95 % of single heads")
        ax.bar(range(len(order)), means.to_numpy(), color=colours, zorder=2)
        ax.axhline(0, color="k", lw=0.6)
        ax.set_ylabel(f"{method}: Δ ε-MSE %")
        if row == 0:
            ax.legend(fontsize=7, loc="upper right")
        ax = axes[row, 1]
        comp = components[components.method == method]
        if comp.empty:
            ax.axis("off")
            continue
        per = comp.groupby("target").agg(d=("degradation_pct", "mean"), k=("n_heads", "first")).reindex(comp_order)
        null = random[random.method == method].groupby("target").agg(d=("degradation_pct", "mean"), k=("n_heads", "first"))
        for i, (name, r) in enumerate(per.iterrows()):
            sets = null[null.k == r.k].d.to_numpy()
            if len(sets):
                lo, hi = np.percentile(sets, [2.5, 97.5])
                ax.add_patch(plt.Rectangle((i - 0.45, lo), 0.9, max(hi - lo, 1e-12), color="0.8", zorder=1))
        ax.bar(range(len(per)), per.d.to_numpy(), width=0.5, color="C3", zorder=2)
        ax.axhline(0, color="k", lw=0.6)
        ax.set_xticks(range(len(per)), [n.replace(".attentions.", ".attn.") for n in per.index], rotation=60,
                      ha="right", fontsize=6)
        ax.set_title("layers and blocks (grey: random heads, same count)" if row == 0 else "", fontsize=8)
    axes[-1, 0].set_xlabel("head (coloured by layer, data-flow order)")
    fig.tight_layout()
    return fig


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def save_figure(path: Path, fig) -> Path:
    """Write ``fig`` as a PNG, atomically, and close it."""
    atomic_write_bytes(path, _png(fig))
    return path


def _fmt(entry: dict) -> str:
    return f"{entry['mean']:.4g} [{entry['ci_low']:.4g}, {entry['ci_high']:.4g}]"


def _headline_rows(summary: dict) -> str:
    entropy = {(e["dataset"], e["timestep"]): e["entropy_norm"] for e in summary["entropy"]}
    rows = []
    for d in summary["denoising"]:
        key = (d["dataset"], d["timestep"])
        rows.append(
            "<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in (
                summary["datasets"][d["dataset"]]["spec"], d["timestep"], _fmt(d["eps_mse"]),
                _fmt(d["eps_mse_trivial"]), _fmt(d["x0_mse"]), _fmt(d["x0_mse_trivial"]), _fmt(entropy[key]),
            )) + "</tr>"
        )
    return "\n".join(rows)


def _divergence_rows(summary: dict) -> str:
    return "\n".join(
        f"<tr><td>{d['timestep']}</td><td>{d['value']:.4f}</td><td>{d['bias_corrected']:.4f} [{d['ci_low']:.4f}, {d['ci_high']:.4f}]</td>"
        f"<td>{d['null_value']:.4f}</td><td>{_p(d['p_value'], d['n_permutations'])}</td></tr>"
        for d in summary["entropy_divergence"])


def _p(p: float, n: int) -> str:
    return f"&lt; {1 / (n + 1):.2g}" if p <= 1 / (n + 1) + 1e-15 else f"{p:.3g}"


def _role_rows(summary: dict) -> str:
    rows = []
    for r in summary["roles"]:
        cells = [html.escape(r["role"]), str(r["timestep"]), str(r["n_heads"])]
        for key in sorted(summary["datasets"]):
            d = r["per_dataset"].get(key)
            cells.append("—" if d is None else f"{_fmt(d['entropy_nats'])} (uniform {d['uniform_nats']:.2f}; "
                                               f"norm. {d['entropy_norm']['mean']:.3f})")
        cells.append(html.escape(r["definition"]))
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return "\n".join(rows)


def _ablation_section(summary: dict, png: str | None) -> str:
    ab = summary.get("ablation")
    if not ab:
        return "<h2>Ablations</h2><p class='note'>Not run (--ablate-n 0).</p>"
    ranges = "".join(f"<tr><td>{html.escape(level)}</td><td>{html.escape(m)}</td><td>{lo:.2f} %</td><td>{hi:.2f} %</td></tr>"
                     for level, by_method in ab["degradation_range_pct"].items() for m, (lo, hi) in by_method.items())
    crit = "".join(f"<tr><td>{html.escape(c['level'])}</td><td>{html.escape(c['method'])}</td><td>{html.escape(c['target'])}</td>"
                   f"<td>{_fmt(c['degradation_pct'])} %</td><td>{c['x0_mse_ratio']:.3f}</td></tr>" for c in ab["largest"])
    sig = "".join(f"<tr><td>{html.escape(c['level'])}</td><td>{html.escape(c['method'])}</td><td>{html.escape(c['target'])}</td>"
                  f"<td>{c['degradation_pct']:.2f} %</td><td>{c['null_degradation_pct']:.2f} %</td>"
                  f"<td>{c['excess_pct']:.2f} [{c['ci_low']:.2f}, {c['ci_high']:.2f}]</td><td>{c['p_corrected']:.3g}</td></tr>"
                  for c in ab.get("critical", []))
    counts = ", ".join(f"{k}: {v} of {ab['n_tested'][k]}" for k, v in ab.get("n_critical", {}).items())
    return f"""<h2>Ablations</h2>
<p class="note">Paired: the same noisy inputs with and without the intervention, on {ab['n_images']} images per dataset.
Degradation = 100·(ε-MSE ablated − clean)/clean, averaged over images, datasets and timesteps. "Largest" ranks by that
mean only; "critical" components are significantly worse than ablating random heads of the same count (paired over
images, BH-corrected within level and method).</p>
<table><tr><th>level</th><th>method</th><th>smallest mean degradation</th><th>largest</th></tr>{ranges}</table>
<h3>Largest effects</h3>
<table><tr><th>level</th><th>method</th><th>target</th><th>degradation [95 % CI]</th><th>x₀-MSE ablated / clean</th></tr>{crit}</table>
<h3>Critical: worse than random heads of the same count</h3>
<p class="note">Critical / tested — {html.escape(counts)}.</p>
<table><tr><th>level</th><th>method</th><th>target</th><th>degradation</th><th>random-head null</th><th>excess [95 % CI]</th><th>q (BH)</th></tr>{sig}</table>
{f'<img alt="single-head ablation effects" src="data:image/png;base64,{png}" style="max-width:100%">' if png else ''}"""


def _patching_section(summary: dict) -> str:
    pt = summary.get("patching")
    if not pt:
        return ""
    rows = "".join(f"<tr><td>{html.escape(r['level'])}</td><td>{html.escape(r['target'])}</td><td>{_fmt(r['moved_frac'])}</td></tr>"
                   for r in pt["largest"])
    return f"""<h2>Activation patching: {html.escape(pt['source'])} → {html.escape(pt['receiver'])}</h2>
<p class="note">{pt['n_pairs']} image pairs, same noise and timestep; a component's activation on the source image replaces
the receiver's. Moved fraction = projection of the output change onto (source output − receiver output), over its
length²: 0 = no move, 1 = all the way. Mean over pairs and timesteps, 95&nbsp;% CI over pairs.</p>
<table><tr><th>level</th><th>target</th><th>moved fraction [95 % CI]</th></tr>{rows}</table>"""


def _attribution_section(summary: dict) -> str:
    at = summary.get("attribution")
    if not at:
        return ""
    labels = {k: v["spec"] for k, v in summary["datasets"].items()}
    rows = "".join(f"<tr><td>{html.escape(r['estimator'])}</td><td>{html.escape(r['method'])}</td>"
                   f"<td>{html.escape(labels.get(r['dataset'], r['dataset']))}</td><td>{r['timestep']}</td>"
                   f"<td>{r['spearman']:.3f}</td><td>{r['top5_overlap']}/5</td></tr>" for r in at)
    return f"""<h2>Attribution patching against exhaustive ablation</h2>
<p class="note">Gradient estimates of every head's ablation effect (first order: one forward and one backward per
batch; IG: 4 interpolation steps, all heads moved together; +gn: first order plus the Gauss-Newton term ‖J·Δa‖²/P from
1 random output probe), ranked against the exhaustive sweep on the same images.</p>
<table><tr><th>estimator</th><th>method</th><th>dataset</th><th>t</th><th>Spearman ρ</th><th>top-5 overlap</th></tr>{rows}</table>"""


def _tests_details(tests: pd.DataFrame | None) -> str:
    """Every hypothesis test, collapsed: what, test, statistic, p, p-floor, corrected p, effect size, n."""
    if tests is None or tests.empty:
        return ""
    rows = "".join(
        f"<tr><td>{html.escape(str(r.family))}</td><td style='text-align:left'>{html.escape(str(r.what))}</td>"
        f"<td>{html.escape(str(r.test))}</td><td>{r.statistic:.4g}</td><td>{r.p_value:.3g}</td><td>{r.p_floor:.2g}</td>"
        f"<td>{r.p_corrected:.3g}</td><td>{r.effect_size:.3g} ({html.escape(str(r.effect_size_kind))})</td>"
        f"<td>{r.n_a}</td><td>{r.n_b}</td></tr>" for r in tests.itertuples())
    return f"""<details><summary>All {len(tests)} tests</summary>
<table><tr><th>family</th><th>what</th><th>test</th><th>statistic</th><th>p</th><th>smallest attainable p</th>
<th>corrected p</th><th>effect size</th><th>n a</th><th>n b</th></tr>{rows}</table></details>"""


def _complexity_section(summary: dict, test_table: pd.DataFrame | None = None) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(r['measure'])}{' (primary)' if r['primary'] else ''}</td><td>{r['value_a']:.4g}</td>"
        f"<td>{r['value_b']:.4g}</td><td>{r['value']:.4f} [{r['ci_low']:.4f}, {r['ci_high']:.4f}]</td>"
        f"<td>{_p(r['p_value'], r['n_permutations'])}</td></tr>" for r in summary.get("complexity_measures", []))
    if not rows:
        return ""
    labels = {k: v["spec"] for k, v in summary["datasets"].items()}
    tests = summary.get("tests") or {"n_tests": 0, "families": {}}
    fam = "".join(f"<tr><td>{html.escape(f)}</td><td>{d['n_tests']}</td><td>{d['significant_bh_0.05']}</td></tr>"
                  for f, d in tests["families"].items())
    return f"""<h2>Circuit complexity: {html.escape(labels['b'])} / {html.escape(labels['a'])}</h2>
<p class="note">Ratio b/a with a percentile-bootstrap 95&nbsp;% CI (images resampled within each dataset) and a permutation
p-value (dataset labels shuffled over images). The primary measure is the participation ratio of single-head ablation
effects: the effective number of heads whose removal matters.</p>
<table><tr><th>measure</th><th>{html.escape(labels['a'])}</th><th>{html.escape(labels['b'])}</th><th>ratio [95 % CI]</th><th>p</th></tr>{rows}</table>
<h3>Statistics appendix</h3>
<p class="note">{tests['n_tests']} tests (listed below and in tables/tests.parquet with statistic, p, corrected p, effect
size and n); the run's correction (Benjamini–Hochberg by default, Holm on request) within each family.</p>
<table><tr><th>family</th><th>tests</th><th>significant after correction (q &lt; 0.05)</th></tr>{fam}</table>
{_tests_details(test_table)}"""


def _paper_section(summary: dict) -> str:
    """The paper's abstract, claim by claim, next to this run's measurement (CI, p, baseline)."""
    cmp = summary.get("paper_comparison")
    if not cmp:
        return ""
    paper, labels = cmp["paper"], {k: v["spec"] for k, v in summary["datasets"].items()}
    rows = []
    r = cmp.get("complexity_ratio")
    ours = "not computed" if not r else (f"{r['value']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}], p = {r['p_value']:.3g}"
                                         f"<br><span class='note'>{html.escape(r['measure'])}, "
                                         f"{html.escape(labels['b'])} / {html.escape(labels['a'])}</span>")
    rows.append(("Circuit complexity, natural / synthetic", paper["complexity_ratio"], ours))
    d = cmp.get("divergence_range")
    if d:
        lo, hi = d["low"], d["high"]
        ours = (f"{lo['bias_corrected']:.3f} (t = {lo['timestep']}) – {hi['bias_corrected']:.3f} (t = {hi['timestep']})"
                f"<br><span class='note'>CIs [{lo['ci_low']:.3f}, {lo['ci_high']:.3f}] and [{hi['ci_low']:.3f}, "
                f"{hi['ci_high']:.3f}]; {html.escape(d['measure'])}</span>")
        rows.append(("Attention divergence between distributions, over timesteps", paper["divergence_range"], ours))
    for role, claim in paper["role_entropy_nats"].items():
        entries = cmp["role_entropy_nats"].get(role) or []
        parts = []
        for e in entries:
            for key in sorted(k for k in e if k in labels):
                v = e[key]
                parts.append(f"t = {e['timestep']}, {html.escape(labels[key])}: {v['entropy_nats']['mean']:.2f} "
                             f"[{v['entropy_nats']['ci_low']:.2f}, {v['entropy_nats']['ci_high']:.2f}] nats "
                             f"(uniform {v['uniform_nats']:.2f}; normalised {v['entropy_norm']:.2f}; {e['n_heads']} heads)")
        rows.append((f"Entropy of {role} heads", claim, "<br>".join(parts) or "no head has this role here"))
    ranges = cmp.get("degradation_range_pct")
    if ranges:
        parts = [f"{level} / {method}: {lo:.1f} – {hi:.1f} %" for level in ("layer", "block", "head") if level in ranges
                 for method, (lo, hi) in sorted(ranges[level].items())]
        rows.append(("Denoising degradation when ablating", paper["degradation_range_pct"] + " %", "<br>".join(parts)))
    body = "".join(f"<tr><td>{html.escape(c)}</td><td>{html.escape(p)}</td><td style='text-align:left'>{o}</td></tr>"
                   for c, p, o in rows)
    return f"""<h2>The paper's claims, measured here</h2>
<p class="note">The abstract of arXiv 2506.17237 (a 262M-parameter UNet, 2,000 CelebA faces vs 2,000 synthetic images)
next to what this run measured on this model and data, with 95&nbsp;% CIs, p-values and the uniform-attention baseline.
The paper's numbers are not targets: they are what a different model and protocol gave. Entropies in nats depend on the
number of keys (ln 64 = 4.16 nats is uniform attention over an 8×8 map), so the normalised entropy is given too.</p>
<table><tr><th>claim</th><th>paper</th><th>this run</th></tr>{body}</table>"""


def _ci(low, high) -> str:
    return "" if low is None else f" [{low:.3g}, {high:.3g}]"


def _circuit_section(summary: dict, pngs: dict[str, str]) -> str:
    found = summary.get("circuits")
    if not found:
        return ""
    labels = {k: v["spec"] for k, v in summary["datasets"].items()}
    rows = []
    for w in found["windows"]:
        o = w.get("overlap_with_other") or {}
        rows.append(
            f"<tr><td>{html.escape(labels.get(w['dataset'], w['dataset']))}</td><td>{html.escape(w['window'])}</td>"
            f"<td>{w['size']}{_ci(*(w.get('size_ci') or (None, None)))}</td>"
            f"<td>{_fmt_num(w['faithfulness'])}</td><td>{_fmt_num(w['completeness'])}</td>"
            f"<td>{_fmt_num(o.get('jaccard'))}{_ci(o.get('ci_low'), o.get('ci_high'))}</td>"
            f"<td style='text-align:left'>{html.escape(', '.join(w.get('unique', [])) or '–')}</td></tr>")
    figures = "".join(f'<img alt="{alt}" src="data:image/png;base64,{pngs[name]}" style="max-width:100%">'
                      for name, alt in (("circuits", "circuits on the layer x head grid"),
                                        ("circuit_curves", "faithfulness and completeness against circuit size"))
                      if name in pngs)
    resamples = found["windows"][0].get("overlap_with_other", {}).get("resamples", 0)
    return f"""<h2>Circuits</h2>
<p class="note">Minimal circuits by ACDC-style pruning ({html.escape(found.get('method') or 'mean')} ablation; heads ranked by
{html.escape(found.get('ranking') or 'exhaustive mean ablation')}), τ = {found['tau']}: the smallest head set whose ablation of everything
else keeps ε-MSE within τ (relative) of the full model. Faithfulness = loss recovered by the circuit alone; completeness =
loss recovered with only the circuit ablated (near 0: the circuit carries everything). Sizes and the synthetic/natural
Jaccard overlap carry 95&nbsp;% percentile intervals over {resamples} bootstrap resamples of the images (discovery rerun on
each). Heads only in this dataset's circuit are listed.</p>
<table><tr><th>dataset</th><th>t</th><th>size [CI]</th><th>faithfulness</th><th>completeness</th><th>Jaccard [CI]</th>
<th>heads only here</th></tr>{''.join(rows)}</table>
{figures}"""


def _fmt_num(x) -> str:
    return "–" if x is None else f"{x:.3g}"


def _seed_section(summary: dict) -> str:
    sv = summary.get("seed_variance")
    if not sv:
        return ""
    labels = {k: v["spec"] for k, v in summary["datasets"].items()} | {"a|b": "a vs b"}
    rows = "".join(f"<tr><td>{html.escape(r['quantity'])}</td><td>{html.escape(labels.get(r['dataset'], r['dataset']))}</td>"
                   f"<td>{r['timestep']}</td><td>{r['mean']:.4f}</td><td>{r['sd']:.4f}</td><td>{r['min']:.4f} – {r['max']:.4f}</td></tr>"
                   for r in sv)
    return f"""<h3>Seed variance</h3>
<p class="note">The same images under {len(sv[0]['seeds'])} noise seeds ({', '.join(map(str, sv[0]['seeds']))}).</p>
<table><tr><th>quantity</th><th>dataset</th><th>t</th><th>mean</th><th>sd</th><th>range</th></tr>{rows}</table>"""


def _model_note(model: dict) -> str:
    """What the model was fed and how its errors are measured, where that is not a plain pixel-space DDPM."""
    notes = []
    if model.get("conditioning"):
        notes.append(f"Conditioning: {model['conditioning']}.")
    if model.get("process") == "flow-matching":
        notes.append("A flow-matching (velocity) model, read exactly as its equivalent ε-predicting DDPM: timestep t "
                     "is the scheduler's σ grid, ε and x₀ are those its velocity implies.")
    latent = model.get("latent")
    if latent:
        notes.append(f"A latent model: images of {latent['image_size']} px were encoded by its {latent['autoencoder']} "
                     f"(posterior mean, scale {latent['scaling_factor']:g}, shift {latent['shift_factor']:g}); ε- and "
                     "x₀-errors are in latent units, attention probes look at the pixels.")
    return "".join(f" {html.escape(n)}" for n in notes)


def _layer_rows(summary: dict) -> str:
    rows = []
    for e in summary["entropy_by_layer"]:
        spec = summary["datasets"][e["dataset"]]["spec"]
        rows.append(f"<tr><td>{html.escape(spec)}</td><td>{e['timestep']}</td><td>{html.escape(e['layer'])}</td>"
                    f"<td>{e['n_keys']}</td><td>{e['entropy_nats']:.3f}</td><td>{e['uniform_nats']:.3f}</td>"
                    f"<td>{e['entropy_norm']:.3f}</td></tr>")
    return "\n".join(rows)


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>diffcircuit report</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;font-size:13px}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}
th{{background:#f3f3f3}}td:first-child{{text-align:left}}.note{{color:#555;font-size:13px}}</style></head>
<body><h1>diffcircuit report</h1>
<p>Model: <code>{model}</code> ({heads} heads in {layers} attention layers). Seed {seed}.{model_note}</p>
<h2>Denoising and attention, per dataset and timestep</h2>
<p class="note">Means over images with 95&nbsp;% percentile-bootstrap CIs (resampled over images).
Trivial predictor: ε̂ = √(1−ᾱ)·x<sub>t</sub>. x₀ error is that of the x₀ implied by ε̂.
Normalised entropy is entropy / ln(n_keys): 1.0 is uniform attention.</p>
<table><tr><th>dataset</th><th>t</th><th>ε-MSE</th><th>ε-MSE trivial</th><th>x₀-MSE</th><th>x₀-MSE trivial</th>
<th>entropy (norm.)</th></tr>
{headline}
</table>
{paper_section}
<h2>Head roles</h2>
<p class="note">Roles are rules on measured probe scores (affinity = attended / uniform), not on entropy alone;
entropy in nats with 95&nbsp;% CI over images, next to the uniform baseline ln(n_keys) of the role's layers.</p>
<table><tr><th>role</th><th>t</th><th>heads</th>{role_dataset_headers}<th>rule</th></tr>
{role_rows}
</table>
<img alt="head roles per layer and timestep" src="data:image/png;base64,{role_png}" style="max-width:100%">
<h2>Synthetic vs natural: divergence of head entropies</h2>
<p class="note">Per timestep: Jensen–Shannon divergence (bits, 10 bins) between the two datasets' per-image
entropies of each head, averaged over heads. The plug-in estimate is biased upwards; the bias-corrected
estimate and its basic-bootstrap CI (images resampled within datasets) estimate the population value; the
null is the plug-in statistic after shuffling dataset labels over images, and p tests against it.</p>
<table><tr><th>t</th><th>mean JSD (plug-in)</th><th>bias-corrected [95 % CI]</th><th>permutation null</th><th>p</th></tr>
{divergence_rows}
</table>
<img alt="divergence across timesteps" src="data:image/png;base64,{divergence_png}" style="max-width:60%">
{ablation_section}
{patching_section}
{attribution_section}
{complexity_section}
{circuit_section}
{seed_section}
{gallery_section}
<h2>Attention entropy per head</h2>
<img alt="normalised attention entropy per head and timestep" src="data:image/png;base64,{heatmap}" style="max-width:100%">
<h2>Entropy per layer against the uniform baseline</h2>
<table><tr><th>dataset</th><th>t</th><th>layer</th><th>keys</th><th>entropy (nats)</th><th>uniform ln(keys)</th>
<th>normalised</th></tr>
{layer_rows}
</table>
<p class="note">Not computed in this run (not selected, or not applicable): {pending}.</p>
</body></html>
"""


def write_report(run_dir: Path, summary: dict, heads: pd.DataFrame, roles: pd.DataFrame,
                 ablations: pd.DataFrame | None = None, circuits: list[dict] | None = None,
                 curves: pd.DataFrame | None = None,
                 gallery: tuple[pd.DataFrame, pd.DataFrame] | None = None, tests: pd.DataFrame | None = None,
                 token_heatmaps: pd.DataFrame | None = None) -> Path:
    """Write the figures (``figures/*.png``) and ``report.html`` into ``run_dir``."""
    labels = {k: v["spec"] for k, v in summary["datasets"].items()}
    figures = {"entropy_heatmap": entropy_heatmap(heads, labels), "role_map": role_map(roles),
               "divergence": divergence_plot(summary["entropy_divergence"])}
    if ablations is not None:
        figures["ablation_heads"] = ablation_bars(ablations)
    if gallery is not None and len(gallery[0]):  # no maps when no head has a square query grid
        figures["attention_gallery"] = attention_gallery(*gallery, labels)
    if gallery is not None and token_heatmaps is not None and len(token_heatmaps):
        figures["token_maps"] = token_heatmap_figure(token_heatmaps, gallery[1], labels)
    if circuits:
        figures["circuits"] = circuit_map([c | {"label": labels.get(c["dataset"], c["dataset"])} for c in circuits], roles)
    if curves is not None and len(curves):
        figures["circuit_curves"] = circuit_curves_plot(curves, labels)
    pngs = {}
    for name, fig in figures.items():
        pngs[name] = _png(fig)
        atomic_write_bytes(run_dir / "figures" / f"{name}.png", pngs[name])
    b64 = {name: base64.b64encode(data).decode() for name, data in pngs.items()}
    page = _PAGE.format(
        role_dataset_headers="".join(f"<th>{html.escape(labels[k])}: entropy nats</th>" for k in sorted(labels)),
        role_rows=_role_rows(summary), role_png=b64["role_map"],
        divergence_rows=_divergence_rows(summary), divergence_png=b64["divergence"],
        ablation_section=_ablation_section(summary, b64.get("ablation_heads")),
        patching_section=_patching_section(summary), attribution_section=_attribution_section(summary),
        complexity_section=_complexity_section(summary, tests), seed_section=_seed_section(summary),
        circuit_section=_circuit_section(summary, b64), paper_section=_paper_section(summary),
        gallery_section=("" if "attention_gallery" not in b64 else (
            "<h2>Attention maps</h2><p class='note'>The two most focal heads (lowest normalised entropy) and the two whose "
            "single-head zero ablation costs most, on the first images of each dataset: where each looks from one query "
            "position (tables/gallery.parquet).</p>"
            f'<img alt="attention map gallery" src="data:image/png;base64,{b64["attention_gallery"]}" style="max-width:100%">'))
        + ("" if "token_maps" not in b64 else
           "<h2>Prompt token maps</h2><p class='note'>DAAM-style: where the image attends to each prompt token, "
           "averaged over every cross- (or joint-) attention head and timestep (tables/token_heatmaps.parquet; per head "
           "and timestep in tables/token_maps.parquet).</p>"
           f'<img alt="prompt token maps" src="data:image/png;base64,{b64["token_maps"]}" style="max-width:100%">'),
        model=html.escape(summary["model"]["source"]), model_note=_model_note(summary["model"]),
        heads=summary["model"]["heads"],
        layers=summary["model"]["layers"], seed=html.escape(str(summary.get("seed", ""))),
        headline=_headline_rows(summary), heatmap=b64["entropy_heatmap"],
        layer_rows=_layer_rows(summary), pending=", ".join(summary["pending"]),
    )
    path = run_dir / "report.html"
    atomic_write_bytes(path, page.encode())
    return path
