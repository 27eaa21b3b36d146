"""The report's figures (matplotlib), each a function of a run's tables or summary, and their PNG bytes."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from diffcircuit.protocol.circuits import CircuitRecord
from diffcircuit.protocol.store import atomic_write_bytes

__all__ = [
    "ablation_bars",
    "attention_gallery",
    "attribution_scatter",
    "circuit_curves_plot",
    "circuit_map",
    "divergence_plot",
    "entropy_heatmap",
    "patching_grid",
    "png_bytes",
    "role_map",
    "save_figure",
    "token_heatmap_figure",
]


def _colour_range(values: np.ndarray, step: float = 0.05) -> tuple[float, float]:
    """The data's range widened to multiples of ``step`` within [0, 1]: the scale shows where the values are."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 0.0, 1.0
    low, high = np.floor(finite.min() / step) * step, np.ceil(finite.max() / step) * step
    return round(float(max(0.0, low)), 6), round(float(min(1.0, max(high, low + step))), 6)


def entropy_heatmap(heads: pd.DataFrame, labels: dict[str, str]):
    """Normalised entropy, heads (rows, grouped by layer; head index on the right) x timesteps, one panel per
    dataset, on a colour scale fitted to the data (its range, to 0.05)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = heads.groupby(["dataset", "layer", "head", "timestep"], sort=False)[
        "entropy_norm"
    ].mean()
    datasets = list(dict.fromkeys(heads["dataset"]))
    vmin, vmax = _colour_range(table.to_numpy(dtype=float))
    fig, axes = plt.subplots(
        1, len(datasets), figsize=(2.6 * len(datasets) + 4.2, 9), squeeze=False, sharey=True
    )
    for k, (ax, ds) in enumerate(zip(axes[0], datasets)):
        grid = table.loc[ds].unstack("timestep")  # rows: (layer, head), columns: timesteps
        im = ax.imshow(
            grid.to_numpy(),
            aspect="auto",
            vmin=vmin,
            vmax=vmax,
            cmap="viridis",
            interpolation="nearest",
        )
        ax.set_title(labels.get(ds, ds), fontsize=9)
        ax.set_xticks(range(grid.shape[1]), [str(t) for t in grid.columns])
        ax.set_xlabel("timestep")
        layers, head_ids = grid.index.get_level_values(0), grid.index.get_level_values(1)
        starts = [i for i in range(len(layers)) if i == 0 or layers[i] != layers[i - 1]]
        for s in starts[1:]:
            ax.axhline(s - 0.5, color="white", lw=0.8)
        if k == 0:  # layer names once, on the left of the first panel
            ax.set_yticks(
                starts, [layers[i].replace(".attentions.", ".attn.") for i in starts], fontsize=6
            )
        if k == len(datasets) - 1:  # each row's head index, on the right of the last panel
            right = ax.secondary_yaxis("right")
            right.set_yticks(range(len(head_ids)), [str(h) for h in head_ids], fontsize=4)
            right.set_ylabel("head", fontsize=7)
    fig.colorbar(
        im,
        ax=axes[0].tolist(),
        label=f"entropy / ln(n_keys)  (1 = uniform; scale {vmin:.2f}–{vmax:.2f})",
        pad=0.06,
    )
    return fig


def _role_colours():
    import matplotlib.pyplot as plt

    from diffcircuit.metrics.roles import ROLES

    names = [*ROLES, "positional", "unassigned"]
    tab10 = plt.get_cmap("tab10").colors
    # no tab10 grey: dark grey is 'positional' (a raw content score its null explains), light grey 'unassigned'
    colours = tuple(tab10[i] for i in (0, 1, 2, 3, 4, 5, 6, 8)) + (
        (0.45, 0.45, 0.45),
        (0.88, 0.88, 0.88),
    )
    return names, colours


def _role_legend(fig, names, colours, *, bottom: float) -> None:
    import matplotlib.pyplot as plt

    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colours]
    fig.legend(handles, names, loc="lower center", ncol=len(names), fontsize=7, frameon=False)
    fig.subplots_adjust(bottom=bottom)


def role_map(roles: pd.DataFrame, labels: dict[str, str] | None = None):
    """Each head's role, layers x heads, one panel per dataset (rows) x timestep (columns)."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    names, colours = _role_colours()
    timesteps = sorted(roles.timestep.unique())
    datasets = sorted(roles.dataset.unique())
    layers = list(dict.fromkeys(roles.layer))
    width = int(roles["head"].max()) + 1
    fig, axes = plt.subplots(
        len(datasets),
        len(timesteps),
        squeeze=False,
        figsize=(2.6 * len(timesteps) + 2, (0.35 * len(layers) + 0.8) * len(datasets) + 0.9),
    )
    for d, dataset in enumerate(datasets):
        for ax, t in zip(axes[d], timesteps):
            grid = np.full((len(layers), width), np.nan)
            for row in roles[(roles.timestep == t) & (roles.dataset == dataset)].itertuples():
                grid[layers.index(row.layer), row.head] = names.index(row.role)
            ax.set_facecolor(
                "white"
            )  # a layer with fewer heads: its missing heads are hatched, not a role colour
            ax.add_patch(
                plt.Rectangle(
                    (-0.5, -0.5),
                    width,
                    len(layers),
                    fill=False,
                    hatch="////",
                    edgecolor="0.7",
                    lw=0,
                    zorder=0,
                )
            )
            ax.imshow(
                np.ma.masked_invalid(grid),
                cmap=ListedColormap(colours),
                vmin=-0.5,
                vmax=len(names) - 0.5,
                aspect="auto",
                zorder=1,
            )
            ax.set_title(f"{(labels or {}).get(dataset, dataset)}, t = {t}", fontsize=9)
            ax.set_yticks(range(len(layers)), layers if ax is axes[d][0] else [], fontsize=6)
            ax.set_xticks(range(0, width, 2))
            if d == len(datasets) - 1:
                ax.set_xlabel("head")
    _role_legend(fig, names, colours, bottom=0.25 / len(datasets))
    fig.subplots_adjust(hspace=0.3)
    fig.text(0.01, 0.01, "hatched: no such head (the layer has fewer)", fontsize=6)
    return fig


def circuit_map(
    circuits: Sequence[CircuitRecord], roles: pd.DataFrame, labels: Mapping[str, str] | None = None
):
    """Each primary-τ circuit on the layer x head grid: circuit heads filled with their role's colour
    on that dataset at that timestep (black edge), the rest hollow; one panel per dataset x window
    (titled with ``labels[dataset]``, default the dataset key)."""
    import matplotlib.pyplot as plt

    names, colours = _role_colours()
    layers = list(dict.fromkeys(roles.layer))
    width = int(roles["head"].max()) + 1
    role_of = {(r.dataset, r.timestep, r.layer, int(r.head)): r.role for r in roles.itertuples()}
    fig, axes = plt.subplots(
        1,
        len(circuits),
        figsize=(2.4 * len(circuits) + 2, 0.35 * len(layers) + 1.8),
        squeeze=False,
        sharey=True,
    )
    for ax, c in zip(axes[0], circuits):
        t = c.timesteps[0]  # a window's heads take their roles at its first timestep
        heads = {
            tuple(h.rsplit(":", 1)) for h in c.heads or ()
        }  # no circuit claimed: every head hollow
        for row in roles[(roles.timestep == t) & (roles.dataset == c.dataset)].itertuples():
            y, x = layers.index(row.layer), int(row.head)
            inside = (row.layer, str(x)) in heads
            colour = colours[names.index(role_of.get((c.dataset, t, row.layer, x), "unassigned"))]
            ax.add_patch(
                plt.Rectangle(
                    (x - 0.42, y - 0.42),
                    0.84,
                    0.84,
                    facecolor=colour if inside else "none",
                    edgecolor="black" if inside else (0.85, 0.85, 0.85),
                    lw=1.2 if inside else 0.6,
                )
            )
        ax.set_xlim(-0.6, width - 0.4)
        ax.set_ylim(len(layers) - 0.5, -0.5)
        what = (
            f"{len(c.heads or ())} heads (τ = {c.tau} of the gap)"
            if c.claimed
            else "no circuit: gap not significantly > 0"
        )
        label = (labels or {}).get(c.dataset, c.dataset)
        ax.set_title(f"{label}, t = {c.window}\n{what}", fontsize=8)
        ax.set_yticks(range(len(layers)), layers, fontsize=6)
        ax.set_xticks(range(0, width, 2))
        ax.set_xlabel("head")
    _role_legend(fig, names, colours, bottom=0.28)
    return fig


def circuit_curves_plot(
    curves: pd.DataFrame,
    labels: Mapping[str, str],
    circuits: Sequence[CircuitRecord] | None = None,
):
    """Faithfulness and recovered_without_circuit of the top-k heads against k, one panel per timestep
    window; with ``circuits``, every window's panel names the datasets without a claimed circuit."""
    import matplotlib.pyplot as plt

    circuits = circuits or []
    windows = list(
        dict.fromkeys([c.window for c in circuits] + (list(curves.window) if len(curves) else []))
    ) or ["–"]
    fig, axes = plt.subplots(
        1, len(windows), figsize=(3.4 * len(windows), 3), squeeze=False, sharey=True
    )
    for ax, t in zip(axes[0], windows):
        here = curves[curves.window == t] if len(curves) else curves
        for i, (ds, g) in enumerate(here.groupby("dataset", sort=True)):
            g = g.sort_values("size")
            ax.plot(
                g["size"],
                g.faithfulness,
                "-o",
                ms=3,
                color=f"C{i}",
                label=f"{labels.get(ds, ds)}: faithfulness",
            )
            ax.plot(
                g["size"],
                g.recovered_without_circuit,
                "--",
                color=f"C{i}",
                label=f"{labels.get(ds, ds)}: recovered without circuit",
            )
        missing = [
            labels.get(c.dataset, c.dataset) for c in circuits if c.window == t and not c.claimed
        ]
        if missing:
            ax.text(
                0.5,
                0.5 if not len(here) else 0.1,
                f"no circuit ({', '.join(missing)}):\nablating every head\ndoes not hurt",
                ha="center",
                va="center",
                transform=ax.transAxes,
                fontsize=7,
            )
        ax.axhline(1, color="k", lw=0.5)
        ax.axhline(0, color="k", lw=0.5)
        ax.set_xscale("symlog", linthresh=2, linscale=0.5)
        ticks = [
            k
            for k in (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
            if len(curves) and k <= curves["size"].max()
        ]
        ax.set_xticks(ticks, [str(k) for k in ticks])
        ax.minorticks_off()
        ax.set_xlim(left=0)
        ax.set_title(f"t = {t}", fontsize=9)
        ax.set_xlabel("circuit size k (top-k heads)")
    axes[0][0].set_ylabel("share of the gap recovered")
    drawn = [ax for ax in axes[0] if ax.lines and ax.get_legend_handles_labels()[0]]
    if drawn:
        drawn[-1].legend(fontsize=7)
    return fig


def _show_picture(ax, pic, label: str) -> np.ndarray:
    """Draw a gallery picture (pixels in [-1, 1]) with its label; returns its grey version for overlays."""
    img = (
        (np.asarray(pic.pixels).reshape(pic.channels, pic.size, pic.size).transpose(1, 2, 0) + 1)
        / 2
    ).clip(0, 1)
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
    fig, axes = plt.subplots(
        len(rows), len(heads) + 1, figsize=(1.7 * (len(heads) + 1), 1.75 * len(rows)), squeeze=False
    )
    pics = {(r.dataset, r.image): r for r in pictures.itertuples()}
    for i, (ds, image) in enumerate(rows):
        pic = pics[(ds, image)]
        grey = _show_picture(axes[i][0], pic, f"{labels.get(ds, ds)} {image}")
        for j, (layer, head) in enumerate(heads, start=1):
            row = maps[
                (maps.dataset == ds)
                & (maps.image == image)
                & (maps.layer == layer)
                & (maps["head"] == head)
            ].iloc[0]
            grid = np.asarray(row["map"]).reshape(row.grid, row.grid)
            scale = pic.size // row.grid
            ax = axes[i][j]
            ax.imshow(grey, cmap="gray", vmin=0, vmax=1)
            ax.imshow(
                np.kron(grid / grid.max(), np.ones((scale, scale))),
                cmap="magma",
                alpha=0.6,
                vmin=0,
                vmax=1,
            )
            ax.plot(
                (row.query_x + 0.5) * scale - 0.5,
                (row.query_y + 0.5) * scale - 0.5,
                "o",
                ms=3,
                color="red",
            )
            if i == 0:
                ax.set_title(f"{layer.replace('.attentions.', '.attn.')}:{head}", fontsize=6)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0][0].set_title("image", fontsize=7)
    t = int(maps.timestep.iloc[0])
    fig.suptitle(
        f"attention from the red query (object centre on synthetic images, else the centre), t = {t}",
        fontsize=8,
    )
    fig.tight_layout()
    scale = plt.cm.ScalarMappable(cmap="magma", norm=plt.Normalize(0, 1))
    fig.colorbar(
        scale,
        ax=axes[:, 1:].ravel().tolist(),
        fraction=0.02,
        pad=0.01,
        label="attention / its maximum in the map",
    )
    return fig


def token_heatmap_figure(heatmaps: pd.DataFrame, pictures: pd.DataFrame, labels: dict[str, str]):
    """Rows: the first image of each dataset; columns: the prompt's tokens. Each token's DAAM heat map
    (mean over cross-attention layers, heads and timesteps) overlaid on the image, on a shared scale."""
    import matplotlib.pyplot as plt

    first = heatmaps.groupby("dataset").image.min()
    shown = heatmaps[heatmaps.image == heatmaps.dataset.map(first)]
    tokens = list(dict.fromkeys(zip(shown.token, shown.text)))
    rows = list(first.items())
    fig, axes = plt.subplots(
        len(rows),
        len(tokens) + 1,
        figsize=(1.6 * (len(tokens) + 1), 1.7 * len(rows)),
        squeeze=False,
    )
    pics = {(r.dataset, r.image): r for r in pictures.itertuples()}
    top = float(np.max(np.stack(shown.heatmap.to_numpy())))
    for i, (ds, image) in enumerate(rows):
        pic = pics[(ds, image)]
        grey = _show_picture(axes[i][0], pic, f"{labels.get(ds, ds)} {image}")
        for j, (token, text) in enumerate(tokens, start=1):
            row = shown[(shown.dataset == ds) & (shown.token == token)].iloc[0]
            axes[i][j].imshow(grey, cmap="gray", vmin=0, vmax=1)
            axes[i][j].imshow(
                np.asarray(row["heatmap"]).reshape(int(row["size"]), int(row["size"])),
                cmap="magma",
                alpha=0.6,
                vmin=0,
                vmax=top,
            )
            if i == 0:
                axes[i][j].set_title(text, fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(
        f"attention to each prompt token (0 to {top:.2f}), mean over cross-attention heads and timesteps",
        fontsize=8,
    )
    fig.tight_layout()
    return fig


def _num(x) -> float:
    return np.nan if x is None else float(x)


def divergence_plot(divergence: list[dict], alpha: float = 0.05):
    """Per timestep. Left: the mean over heads of the entropy difference b − a (nats) with its 95 % CI.
    Right: the Wasserstein-1 divergence less its permutation-null mean, and the line it must pass for
    p < α (the null's critical value, same offset): a point lies above the line exactly when its p < α.
    Filled markers: p < α (two-sided permutation on the left, one-sided on the right)."""
    import matplotlib.pyplot as plt

    t = np.array([d["timestep"] for d in divergence])
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.5, 3.3))
    diff = np.array([_num(d["entropy_diff_nats"]) for d in divergence])
    low, high = (
        np.array([_num(d[k]) for d in divergence]) for k in ("ci_low_nats", "ci_high_nats")
    )
    shown = np.isfinite(low)
    left.errorbar(
        t[shown],
        diff[shown],
        yerr=[diff[shown] - low[shown], high[shown] - diff[shown]],
        fmt="none",
        ecolor="C0",
        capsize=3,
    )
    sig = np.array([d["p_value"] is not None and d["p_value"] < alpha for d in divergence])
    left.plot(t[sig], diff[sig], "o", color="C0", label=f"p < {alpha}")
    left.plot(t[~sig], diff[~sig], "o", mfc="white", color="C0", label=f"p ≥ {alpha}")
    for x, y, d in zip(t[~shown], diff[~shown], [d for d, ok in zip(divergence, shown) if not ok]):
        left.annotate(
            "no CI:\n" + (d["ci_withheld"] or "not computed"),
            (x, y),
            fontsize=6,
            ha="center",
            va="bottom",
        )
    left.axhline(0, color="k", lw=0.6)
    left.set_ylabel("entropy b − a, mean over heads (nats)")
    left.set_title("entropy difference (95 % CI over images)", fontsize=8)
    excess = np.array([_num(d["wasserstein_excess_nats"]) for d in divergence])
    critical = np.array(
        [
            _num(d["wasserstein_null_critical_nats"]) - _num(d["wasserstein_null_mean_nats"])
            for d in divergence
        ]
    )  # inf (None) where p < α cannot be reached
    wsig = np.array(
        [d["wasserstein_p"] is not None and d["wasserstein_p"] < alpha for d in divergence]
    )
    right.plot(
        t,
        np.where(np.isfinite(critical), critical, np.nan),
        "k_",
        ms=14,
        mew=1.5,
        label=f"null critical value (p < {alpha} above)",
    )
    right.plot(t[wsig], excess[wsig], "s", color="C1", label=f"p < {alpha}")
    right.plot(t[~wsig], excess[~wsig], "s", mfc="white", color="C1", label=f"p ≥ {alpha}")
    for x, c, y in zip(t, critical, excess):
        if not np.isfinite(c):
            right.annotate("cannot reach\np < α here", (x, y), fontsize=6, ha="center", va="bottom")
    right.axhline(0, color="k", lw=0.6, ls="--")
    right.set_ylabel("W1 − null mean (nats)")
    right.set_title("Wasserstein-1 divergence, null-corrected", fontsize=8)
    for ax in (left, right):
        ax.set_xlabel("timestep")
        ax.legend(fontsize=7)
    fig.tight_layout()
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
    fig, axes = plt.subplots(
        len(methods),
        2,
        figsize=(14, 2.6 * len(methods) + 0.8),
        squeeze=False,
        gridspec_kw={"width_ratios": [3, 1]},
    )
    for row, method in enumerate(methods):
        _head_bars(axes[row, 0], heads[heads.method == method], order, legend=row == 0)
        axes[row, 0].set_ylabel(f"{method}: Δ ε-MSE %")
        ax = axes[row, 1]
        comp = components[components.method == method]
        if comp.empty:
            ax.axis("off")
            continue
        per = (
            comp.groupby("target")
            .agg(d=("degradation_pct", "mean"), k=("n_heads", "first"))
            .reindex(comp_order)
        )
        null = (
            random[random.method == method]
            .groupby("target")
            .agg(d=("degradation_pct", "mean"), k=("n_heads", "first"))
        )
        for i, (_, r) in enumerate(per.iterrows()):
            sets = null[null.k == r.k].d.to_numpy()
            if len(sets):
                lo, hi = np.percentile(sets, [2.5, 97.5])
                ax.add_patch(
                    plt.Rectangle((i - 0.45, lo), 0.9, max(hi - lo, 1e-12), color="0.8", zorder=1)
                )
        ax.bar(range(len(per)), per.d.to_numpy(), width=0.5, color="C3", zorder=2)
        ax.axhline(0, color="k", lw=0.6)
        ax.set_xticks(
            range(len(per)),
            [n.replace(".attentions.", ".attn.") for n in per.index],
            rotation=60,
            ha="right",
            fontsize=6,
        )
        ax.set_title(
            "layers and blocks (grey: random heads, same count)" if row == 0 else "", fontsize=8
        )
    axes[-1, 0].set_xlabel("head index within its layer (layers in data-flow order)")
    fig.tight_layout()
    return fig


def _head_bars(ax, rows: pd.DataFrame, order: list[str], *, legend: bool) -> None:
    """Each single head's mean degradation with its 95 % t-interval over images, coloured by layer (legend), its
    index within the layer below it; grey band: the middle 95 % of single heads' means."""
    from scipy import stats

    per = rows.groupby("target")["degradation_pct"].agg(["mean", "std", "count"]).reindex(order)
    half = stats.t.ppf(0.975, np.maximum(per["count"] - 1, 1)) * per["std"] / np.sqrt(per["count"])
    layers = [t.rsplit(":", 1)[0] for t in order]
    names = list(dict.fromkeys(layers))
    low, high = np.nanpercentile(per["mean"].to_numpy(), [2.5, 97.5])
    ax.axhspan(low, high, color="0.88", zorder=0, label="middle 95 % of single heads")
    x = np.arange(len(order))
    for k, layer in enumerate(names):
        at = np.array([i for i, name in enumerate(layers) if name == layer])
        ax.bar(
            x[at],
            per["mean"].to_numpy()[at],
            color=f"C{k % 10}",
            zorder=2,
            label=layer.replace(".attentions.", ".attn."),
        )
    ax.errorbar(
        x,
        per["mean"].to_numpy(),
        yerr=half.fillna(0).to_numpy(),
        fmt="none",
        ecolor="k",
        elinewidth=0.5,
        capsize=0,
        zorder=3,
        label="95 % t-interval over images",
    )
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xticks(x, [t.rsplit(":", 1)[1] for t in order], fontsize=4)
    ax.set_xlim(-1, len(order))
    if legend:
        ax.legend(fontsize=6, loc="upper right", ncol=2)


def png_bytes(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def save_figure(path: Path, fig) -> Path:
    """Write ``fig`` as a PNG, atomically, and close it."""
    atomic_write_bytes(path, png_bytes(fig))
    return path


def attribution_scatter(attribution: pd.DataFrame, ablations: pd.DataFrame):
    """Each head's attribution estimate against the exhaustive single-head ablation it estimates (mean over images,
    degradation %), one panel per dataset x timestep, one marker per estimator, the identity line dashed.
    ``ig_joint`` estimates the all-heads ablation's share per head, not a single-head ablation: left out."""
    import matplotlib.pyplot as plt

    singles = ablations[ablations.level == "head"]
    truth = singles.groupby(["dataset", "timestep", "method", "target"]).degradation_pct.mean()
    est = attribution[attribution.estimator != "ig_joint"].assign(
        target=lambda f: f.layer + ":" + f["head"].astype(str)
    )
    means = (
        est.groupby(["dataset", "timestep", "method", "estimator", "target"])
        .degradation_pct.mean()
        .reset_index()
    )
    panels = list(dict.fromkeys(zip(means.dataset, means.timestep)))
    fig, axes = plt.subplots(
        1, max(1, len(panels)), figsize=(3.2 * max(1, len(panels)) + 0.6, 3.3), squeeze=False
    )
    for ax, (ds, t) in zip(axes[0], panels):
        here = means[(means.dataset == ds) & (means.timestep == t)]
        for k, (name, g) in enumerate(here.groupby("estimator", sort=True)):
            x = truth.reindex(list(zip(g.dataset, g.timestep, g.method, g.target))).to_numpy()
            ax.plot(
                x, g.degradation_pct.to_numpy(), "o", ms=3, alpha=0.7, color=f"C{k}", label=name
            )
        lo, hi = ax.get_xlim()
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.6)
        ax.set_title(f"{ds}, t = {t}", fontsize=8)
        ax.set_xlabel("exhaustive single-head ablation (Δ %)", fontsize=7)
    axes[0][0].set_ylabel("attribution estimate (Δ %)", fontsize=7)
    axes[0][-1].legend(fontsize=6)
    fig.tight_layout()
    return fig


def patching_grid(patching: pd.DataFrame):
    """Each head's moved fraction (mean over pairs), layers x heads, one panel per timestep, on a diverging scale
    centred at 0 (1: the receiver's output moved all the way to the source's); hatched: no such head."""
    import matplotlib.pyplot as plt

    heads = patching[patching.level == "head"]
    if heads.empty:
        return None
    layers = list(dict.fromkeys(heads.layer))
    width = int(heads["head"].max()) + 1
    means = heads.groupby(["timestep", "layer", "head"]).moved_frac.mean()
    timesteps = sorted(heads.timestep.unique())
    top = max(float(np.nanmax(np.abs(means.to_numpy()))), 1e-6)
    fig, axes = plt.subplots(
        1,
        len(timesteps),
        figsize=(2.6 * len(timesteps) + 2.4, 0.35 * len(layers) + 1.4),
        squeeze=False,
        sharey=True,
    )
    for ax, t in zip(axes[0], timesteps):
        grid = np.full((len(layers), width), np.nan)
        for (layer, head), v in means.loc[t].items():
            grid[layers.index(layer), int(head)] = v
        ax.add_patch(
            plt.Rectangle(
                (-0.5, -0.5), width, len(layers), fill=False, hatch="////", edgecolor="0.7", lw=0
            )
        )
        im = ax.imshow(
            np.ma.masked_invalid(grid), cmap="RdBu_r", vmin=-top, vmax=top, aspect="auto"
        )
        ax.set_title(f"t = {t}", fontsize=8)
        ax.set_xlabel("head")
        ax.set_yticks(
            range(len(layers)), [n.replace(".attentions.", ".attn.") for n in layers], fontsize=6
        )
    fig.colorbar(im, ax=axes[0].tolist(), label="moved fraction (mean over pairs)")
    return fig
