"""``report.html``: a self-contained page (figures embedded) rebuilt from a run directory's files."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import pandas as pd

from diffcircuit.protocol.store import atomic_write_bytes

__all__ = ["entropy_heatmap", "write_report"]


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


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


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
<p>Model: <code>{model}</code> ({heads} heads in {layers} attention layers). Seed {seed}.</p>
<h2>Denoising and attention, per dataset and timestep</h2>
<p class="note">Means over images with 95&nbsp;% percentile-bootstrap CIs (resampled over images).
Trivial predictor: ε̂ = √(1−ᾱ)·x<sub>t</sub>. x₀ error is that of the x₀ implied by ε̂.
Normalised entropy is entropy / ln(n_keys): 1.0 is uniform attention.</p>
<table><tr><th>dataset</th><th>t</th><th>ε-MSE</th><th>ε-MSE trivial</th><th>x₀-MSE</th><th>x₀-MSE trivial</th>
<th>entropy (norm.)</th></tr>
{headline}
</table>
<h2>Attention entropy per head</h2>
<img alt="normalised attention entropy per head and timestep" src="data:image/png;base64,{heatmap}" style="max-width:100%">
<h2>Entropy per layer against the uniform baseline</h2>
<table><tr><th>dataset</th><th>t</th><th>layer</th><th>keys</th><th>entropy (nats)</th><th>uniform ln(keys)</th>
<th>normalised</th></tr>
{layer_rows}
</table>
<p class="note">Not yet computed in this version: {pending}.</p>
</body></html>
"""


def write_report(run_dir: Path, summary: dict, heads: pd.DataFrame) -> Path:
    """Write ``figures/entropy_heatmap.png`` and ``report.html`` into ``run_dir``."""
    labels = {k: v["spec"] for k, v in summary["datasets"].items()}
    png = _png(entropy_heatmap(heads, labels))
    atomic_write_bytes(run_dir / "figures" / "entropy_heatmap.png", png)
    page = _PAGE.format(
        model=html.escape(summary["model"]["source"]), heads=summary["model"]["heads"],
        layers=summary["model"]["layers"], seed=html.escape(str(summary.get("seed", ""))),
        headline=_headline_rows(summary), heatmap=base64.b64encode(png).decode(),
        layer_rows=_layer_rows(summary), pending=", ".join(summary["pending"]),
    )
    path = run_dir / "report.html"
    atomic_write_bytes(path, page.encode())
    return path
