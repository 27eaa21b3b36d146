"""Circuit discovery inside the protocol: per dataset and timestep window, several τ, with stability.

Importance of a head = its mean predicted or measured single-head ablation degradation over the
images: the run's exhaustive mean-ablation rows, or attribution scores where an exhaustive sweep is
not affordable (``diffcircuit discover --ranking attribution``). Any table with columns
``dataset``, ``timestep``, ``image``, ``target``, ``degradation_pct`` will do.

A window is a set of timesteps whose losses are averaged (by default each analysed timestep is its
own window). For each dataset and window, ``prune_circuit`` is run at every τ and
``circuit_curve`` traces faithfulness and completeness against circuit size. The primary τ is
rerun on bootstrap resamples of the images (importance recomputed from the resampled rows, the same
draws for both datasets) to give each head's selection frequency and a percentile bootstrap
interval for the synthetic-vs-natural overlap (Jaccard) of the circuits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd

from diffcircuit.discovery.circuits import Circuit, CircuitLoss, circuit_curve, jaccard, prune_circuit
from diffcircuit.instrument.registry import HeadRegistry

__all__ = ["PRIMARY_TAU", "discover_circuits", "importance_rows", "window_name"]

PRIMARY_TAU = 0.05


def _finite(x: float) -> float | None:
    return None if x != x else x  # JSON has no NaN


def importance_rows(table: pd.DataFrame, *, method: str = "mean", estimator: str | None = None) -> pd.DataFrame:
    """Single-head rows of an ablation table (``estimator`` None) or an attribution table, one ``method``."""
    rows = table[table.method == method]
    if estimator is None:
        rows = rows[rows.level == "head"]
    else:
        rows = rows[rows.estimator == estimator]
        rows = rows.assign(target=rows.layer + ":" + rows["head"].astype(str))
    return rows[["dataset", "timestep", "image", "target", "degradation_pct"]]


def window_name(window: Sequence[int]) -> str:
    """``"500"`` for one timestep, ``"100-300"`` for a window of several."""
    return "-".join(str(int(t)) for t in window)


def _importance(rows: pd.DataFrame, registry: HeadRegistry) -> dict:
    return {registry.parse(t): v for t, v in rows.groupby("target").degradation_pct.mean().items()}


def discover_circuits(denoiser, images: dict[str, np.ndarray], importance: pd.DataFrame, *, registry: HeadRegistry,
                      windows: Sequence[Sequence[int]], taus: Sequence[float] = (0.02, PRIMARY_TAU, 0.1), resamples: int = 3,
                      seed: int = 0, ranking: str = "exhaustive mean ablation",
                      progress: Callable[[int], None] | None = None) -> tuple[pd.DataFrame, list[dict], pd.DataFrame]:
    """``(table, circuits, curves)``: one table row per dataset x window x τ x head; one JSON-ready dict
    per dataset x window; one curve row per dataset x window x circuit size. ``windows``: tuples of
    timesteps (each a window whose losses and importances are averaged).

    ``importance``: per-image single-head degradations (see :func:`importance_rows`); ``ranking``
    names where they came from, for the record.
    """
    rows, circuits, curves, boot_sets = [], [], [], {}
    n_common = min(len(v) for v in images.values())
    for window in windows:
        window, name = [int(t) for t in window], window_name(window)
        rng = np.random.default_rng([seed, *window])  # per window: one window's draws do not depend on the others
        draws = [rng.integers(0, n_common, n_common) for _ in range(resamples)]
        for dataset, x in images.items():
            here = importance[(importance.dataset == dataset) & importance.timestep.isin(window)]
            loss = CircuitLoss(denoiser, x, timesteps=window, dataset=dataset, seed=seed, registry=registry)
            scores = _importance(here, registry)
            found: dict[float, Circuit] = {tau: prune_circuit(loss, scores, tau) for tau in taus}
            curves += [{"dataset": dataset, "window": name, "method": loss.method, **point}
                       for point in circuit_curve(loss, scores)]
            boot = []
            for draw in draws:  # the same resampled image indices for both datasets
                boot_loss = CircuitLoss(denoiser, x[draw], timesteps=window, dataset=f"{dataset}/boot", seed=seed,
                                        registry=registry, which=(dataset, draw))  # captions follow the resampled images
                boot_rows = pd.concat([here[here.image == i] for i in draw])
                boot.append(prune_circuit(boot_loss, _importance(boot_rows, registry), PRIMARY_TAU).heads)
            boot_sets[(dataset, name)] = boot
            frequency = {a: float(np.mean([a in b for b in boot])) if boot else float("nan") for a in registry}
            for tau, c in found.items():
                rows += [{"dataset": dataset, "window": name, "tau": tau, "head": str(a), "in_circuit": a in c.heads,
                          "importance_pct": scores.get(a, float("nan")), "selection_frequency": frequency[a]}
                         for a in registry]
            primary = found[PRIMARY_TAU]
            circuits.append({
                "dataset": dataset, "window": name, "timesteps": window, "method": loss.method, "tau": PRIMARY_TAU, "ranking": ranking,
                "heads": [str(a) for a in primary.heads], "faithfulness": _finite(primary.faithfulness),
                "completeness": _finite(primary.completeness), "loss_full": primary.loss_full, "loss_empty": primary.loss_empty,
                "selection_frequency": {str(a): f for a, f in frequency.items() if f > 0},
                "boot_sizes": [len(b) for b in boot],
                "by_tau": [{"tau": tau, "size": len(c.heads), "faithfulness": _finite(c.faithfulness),
                            "completeness": _finite(c.completeness)} for tau, c in found.items()],
            })
            if progress is not None:
                progress(1)
    _add_overlaps(circuits, boot_sets)
    return pd.DataFrame(rows), circuits, pd.DataFrame(curves)


def _percentile_interval(values: list[float]) -> tuple[float | None, float | None]:
    """The 2.5th and 97.5th percentiles of the defined bootstrap replicates (None with fewer than 2)."""
    values = [v for v in values if v == v]
    if len(values) < 2:
        return None, None
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def _add_overlaps(circuits: list[dict], boot_sets: dict) -> None:
    """Jaccard overlap of the two datasets' circuits per window, with its bootstrap percentile interval."""
    by_window: dict[str, dict[str, dict]] = {}
    for c in circuits:
        by_window.setdefault(c["window"], {})[c["dataset"]] = c
    for t, pair in by_window.items():
        if set(pair) != {"a", "b"}:
            continue
        value = jaccard(pair["a"]["heads"], pair["b"]["heads"])
        boot = [jaccard(x, y) for x, y in zip(boot_sets[("a", t)], boot_sets[("b", t)])]
        low, high = _percentile_interval(boot)
        defined = [v for v in boot if v == v]
        overlap = {"jaccard": _finite(value), "ci_low": low, "ci_high": high, "resamples": len(boot),
                   "resamples_defined": len(defined),
                   "boot_min": float(np.min(defined)) if defined else None,
                   "boot_max": float(np.max(defined)) if defined else None,
                   "only_a": sorted(set(pair["a"]["heads"]) - set(pair["b"]["heads"])),
                   "only_b": sorted(set(pair["b"]["heads"]) - set(pair["a"]["heads"]))}
        for c in pair.values():
            c["overlap_with_other"] = overlap
        sizes = {k: _percentile_interval([float(s) for s in pair[k]["boot_sizes"]]) for k in ("a", "b")}
        for k, c in pair.items():
            c["size_ci"] = sizes[k]
