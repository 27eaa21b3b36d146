"""Circuit discovery inside the protocol: per dataset and timestep window, several τ, with stability.

Importance of a head = its single-head mean-ablation degradation from the run's ablation table
(same images, noise and timesteps). For each dataset and window (one analysed timestep each),
``prune_circuit`` is run at every τ; the primary τ is also rerun on bootstrap resamples of the
images (importance recomputed from the resampled rows) to give each head's selection frequency
and a CI for the synthetic-vs-natural overlap (Jaccard) of the circuits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd

from diffcircuit.discovery.circuits import Circuit, CircuitLoss, jaccard, prune_circuit
from diffcircuit.instrument.registry import HeadRegistry

__all__ = ["PRIMARY_TAU", "discover_circuits"]


def _finite(x: float) -> float | None:
    return None if x != x else x  # JSON has no NaN

PRIMARY_TAU = 0.05


def _importance(rows: pd.DataFrame, registry: HeadRegistry) -> dict:
    return {registry.parse(t): v for t, v in rows.groupby("target").degradation_pct.mean().items()}


def discover_circuits(denoiser, images: dict[str, np.ndarray], ablations: pd.DataFrame, *, registry: HeadRegistry,
                      timesteps: Sequence[int], taus: Sequence[float] = (0.02, PRIMARY_TAU, 0.1), resamples: int = 3,
                      seed: int = 0, progress: Callable[[int], None] | None = None) -> tuple[pd.DataFrame, list[dict]]:
    """``(table, circuits)``: one table row per dataset x window x τ x head; one JSON-ready dict per dataset x window."""
    single = ablations[(ablations.level == "head") & (ablations.method == "mean")]
    rows, circuits, boot_sets = [], [], {}
    rng = np.random.default_rng(seed)
    for t in timesteps:
        draws = [rng.integers(0, min(len(v) for v in images.values()), min(len(v) for v in images.values()))
                 for _ in range(resamples)]
        for dataset, x in images.items():
            here = single[(single.dataset == dataset) & (single.timestep == t)]
            loss = CircuitLoss(denoiser, x, timesteps=[t], dataset=dataset, seed=seed, registry=registry)
            importance = _importance(here, registry)
            found: dict[float, Circuit] = {tau: prune_circuit(loss, importance, tau) for tau in taus}
            boot = []
            for draw in draws:  # the same resampled image indices for both datasets
                boot_loss = CircuitLoss(denoiser, x[draw], timesteps=[t], dataset=f"{dataset}/boot", seed=seed,
                                        registry=registry)
                boot_rows = pd.concat([here[here.image == i] for i in draw])
                boot.append(prune_circuit(boot_loss, _importance(boot_rows, registry), PRIMARY_TAU).heads)
            boot_sets[(dataset, t)] = boot
            frequency = {a: float(np.mean([a in b for b in boot])) if boot else float("nan") for a in registry}
            for tau, c in found.items():
                rows += [{"dataset": dataset, "timestep": int(t), "tau": tau, "head": str(a), "in_circuit": a in c.heads,
                          "importance_pct": importance.get(a, float("nan")), "selection_frequency": frequency[a]}
                         for a in registry]
            primary = found[PRIMARY_TAU]
            circuits.append({
                "dataset": dataset, "timesteps": [int(t)], "method": "mean", "tau": PRIMARY_TAU,
                "heads": [str(a) for a in primary.heads], "faithfulness": _finite(primary.faithfulness),
                "completeness": _finite(primary.completeness), "loss_full": primary.loss_full, "loss_empty": primary.loss_empty,
                "selection_frequency": {str(a): f for a, f in frequency.items() if f > 0},
                "by_tau": [{"tau": tau, "size": len(c.heads), "faithfulness": _finite(c.faithfulness),
                            "completeness": _finite(c.completeness)} for tau, c in found.items()],
            })
            if progress is not None:
                progress(1)
    _add_overlaps(circuits, boot_sets)
    return pd.DataFrame(rows), circuits


def _add_overlaps(circuits: list[dict], boot_sets: dict) -> None:
    """Jaccard overlap of the two datasets' circuits per window, with the range over resamples."""
    by_window: dict[int, dict[str, dict]] = {}
    for c in circuits:
        by_window.setdefault(c["timesteps"][0], {})[c["dataset"]] = c
    for t, pair in by_window.items():
        if set(pair) != {"a", "b"}:
            continue
        value = jaccard(pair["a"]["heads"], pair["b"]["heads"])
        boot = [jaccard(x, y) for x, y in zip(boot_sets[("a", t)], boot_sets[("b", t)])]
        overlap = {"jaccard": value, "boot_low": float(np.min(boot)) if boot else None,
                   "boot_high": float(np.max(boot)) if boot else None, "resamples": len(boot),
                   "only_a": sorted(set(pair["a"]["heads"]) - set(pair["b"]["heads"])),
                   "only_b": sorted(set(pair["b"]["heads"]) - set(pair["a"]["heads"]))}
        for c in pair.values():
            c["overlap_with_other"] = overlap
