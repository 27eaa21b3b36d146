"""What the ``diffcircuit`` commands show on the console: progress bars while they work, then the tables and lines
of their results."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from diffcircuit.protocol.circuits import CircuitRecord

__all__ = ["Bars", "circuit_table", "claim_lines", "headline_table"]

console = Console(stderr=True)


class Bars:
    """Rich progress bars that appear with the first update (after inputs are validated), one per stage."""

    def __init__(self, quiet: bool):
        self.quiet, self.progress, self.tasks = quiet, None, {}

    def __enter__(self) -> Bars:
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()

    def update(
        self,
        stage: str,
        *,
        completed: int | None = None,
        total: int | None = None,
        advance: int | None = None,
        description: str | None = None,
    ) -> None:
        if self.quiet:
            return
        if self.progress is None:
            self.progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=console,
            )
            self.progress.start()
        if stage not in self.tasks:
            self.tasks[stage] = self.progress.add_task(description or stage, total=total)
        self.progress.update(
            self.tasks[stage],
            completed=completed,
            total=total,
            advance=advance,
            description=description,
        )


def headline_table(summary) -> Table:
    """The console's headline table from a ``Summary``."""
    entropy = {(e["dataset"], e["timestep"]): e["entropy_norm"]["mean"] for e in summary.entropy}
    table = Table(title="diffcircuit: denoising and attention entropy (means over images)")
    for col in (
        "dataset",
        "t",
        "ε-MSE",
        "ε-MSE trivial",
        "x₀-MSE",
        "x₀-MSE trivial",
        "entropy / ln keys",
    ):
        table.add_column(col, justify="right", overflow="fold")  # narrow terminals: wrap, never cut
    for d in summary.denoising:
        spec = summary.datasets[d["dataset"]]["spec"]
        table.add_row(
            spec,
            str(d["timestep"]),
            f"{d['eps_mse']['mean']:.4g}",
            f"{d['eps_mse_trivial']['mean']:.4g}",
            f"{d['x0_mse']['mean']:.4g}",
            f"{d['x0_mse_trivial']['mean']:.4g}",
            f"{entropy[(d['dataset'], d['timestep'])]:.3f}",
        )
    return table


def _interval_text(est, low, high, withheld, p, floor, can_reject) -> str:
    ci = f"no interval ({withheld})" if low is None else f"[{low:.4g}, {high:.4g}]"
    flag = "" if can_reject else f", cannot reach p < 0.05 at this n (smallest p {floor:.2g})"
    return f"{est:.4g} {ci}, p = {p:.3g}{flag}"


def claim_lines(summary) -> list[str]:
    """The headline divergence and complexity per timestep of a ``Summary``, each with its interval and flags."""
    excluded = set((summary.paper_comparison or {}).get("excluded_timesteps", []))

    def flag(t) -> str:
        return " [uninformative timestep: not a headline claim]" if int(t) in excluded else ""

    lines = [
        f"entropy b − a (mean over heads, nats), t = {d['timestep']}: "
        + _interval_text(
            d["entropy_diff_nats"],
            d["ci_low_nats"],
            d["ci_high_nats"],
            d["ci_withheld"],
            d["p_value"],
            d["p_floor"],
            d["can_reject"],
        )
        + f"; {d['n_heads_differ']}/{d['n_heads']} heads differ"
        + flag(d["timestep"])
        for d in summary.entropy_divergence
    ]
    ratio = summary.complexity_ratio
    for r in (ratio or {}).get("per_timestep", []):
        mde = "unknown" if r["mde_ratio"] is None else f"{r['mde_ratio']:.3g}"
        lines.append(
            f"complexity {ratio['measure']}{' (stand-in)' if ratio['stand_in_for'] else ''}, t = {r['timestep']}: "
            + _interval_text(
                r["value"],
                r["ci_low"],
                r["ci_high"],
                r["ci_withheld"],
                r["p_value"],
                r["p_floor"],
                r["can_reject"],
            )
            + f"; smallest detectable ratio {mde}"
            + (
                " (not the paper's measure)"
                if ratio["stand_in_for"]
                else f" (underpowered vs the paper's {ratio['paper_ratio']})"
                if r["underpowered"]
                else ""
            )
            + flag(r["timestep"])
        )
    return lines


def _interval(span, ci) -> str:
    """``[lo, hi]`` for a 95 % interval, ``range lo–hi`` for the bare range of too few replicates."""
    if ci:
        return f"[{ci[0]:.3g}, {ci[1]:.3g}]"
    return "–" if not span else f"range {span[0]:.3g}–{span[1]:.3g}"


def circuit_table(circuits: Sequence[CircuitRecord], labels: Mapping[str, str]) -> Table:
    """The circuits of ``discover``, one row per dataset (``labels[dataset]``) x window."""
    c0 = circuits[0]
    table = Table(
        title=f"circuits (τ = {c0.tau} of the gap, {c0.method} ablation, {c0.metric} loss)"
    )
    for col in (
        "dataset",
        "t",
        "gap [95% CI], p, q",
        "heads",
        "size range/CI (R)",
        "faithfulness",
        "out of bag",
        "recovered w/o circuit",
        "necessary",
        "Jaccard",
    ):
        table.add_column(col)
    for c in circuits:
        g, o = c.gap, c.overlap_with_other or {}
        full = (
            c.loss_full / 100 if g["relative"] is not None else 1.0
        )  # the gap in % of L_full where L_full > 0
        unit = "%" if g["relative"] is not None else ""
        ci = (
            ""
            if g["ci_low"] is None
            else f" [{g['ci_low'] / full:+.3g}, {g['ci_high'] / full:+.3g}]"
        )  # no interval from fewer than MIN_UNITS_FOR_CI images
        q = g.get("p_corrected") if (g.get("family_size") or 1) > 1 else None
        gap = f"{g['mean'] / full:+.3g}{unit}{ci}, p {g['p_value']:.3g}" + (
            "" if q is None else f", q {q:.3g}"
        )
        if not c.claimed:
            table.add_row(
                labels.get(c.dataset, c.dataset),
                c.window,
                gap,
                "no circuit",
                "–",
                "–",
                "–",
                "–",
                "–",
                "–",
            )
            continue
        jac = (
            "–"
            if o.get("jaccard") is None
            else (
                f"{o['jaccard']:.2f} "
                + _interval(
                    [o["range_low"], o["range_high"]] if o["range_low"] is not None else None,
                    [o["ci_low"], o["ci_high"]] if o["ci_low"] is not None else None,
                )
            )
        )
        table.add_row(
            labels.get(c.dataset, c.dataset),
            c.window,
            gap,
            str(c.size),
            f"{_interval(c.size_range, c.size_ci)} ({c.resamples})",
            _num(c.faithfulness),
            _num((c.out_of_bag or {}).get("faithfulness")),
            _num(c.recovered_without_circuit),
            f"{c.n_necessary}/{c.size}",
            jac,
        )
    return table


def _num(x) -> str:
    return "–" if x is None else f"{x:.3f}"
