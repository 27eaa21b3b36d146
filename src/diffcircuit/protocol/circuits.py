"""Circuit discovery inside the protocol: per dataset and timestep window, several τ, with stability.

Importance of a head = its mean predicted or measured single-head ablation degradation over the
images: the run's exhaustive mean-ablation rows, or attribution scores where an exhaustive sweep is
not affordable (``diffcircuit discover --ranking attribution``). Any table with columns
``dataset``, ``timestep``, ``image``, ``target``, ``degradation_pct`` will do.

A window is a set of timesteps whose losses are averaged (by default each analysed timestep is its
own window). For each dataset and window the gap L_empty − L_full is tested first
(:func:`~diffcircuit.discovery.circuits.gap_test`; the run's dataset x window gap tests are corrected
together, Benjamini–Hochberg by default); where it is not significantly positive no
circuit is claimed (``claimed`` false, ``heads`` and ``faithfulness`` null, ``claim`` saying so)
and nothing else is computed. Otherwise ``prune_circuit`` runs at every τ (fractions of the gap),
the primary circuit's individually necessary heads are counted, ``circuit_curve`` traces
faithfulness against circuit size, and the primary τ is rerun on bootstrap resamples of the images
(importance recomputed from the resampled rows, the same draws for both datasets) for each head's
selection frequency and the variability of sizes, overlap and size ratio, and for the circuit's faithfulness
out of sample: each resample's circuit scored on the images its draw left out (``OutOfBag``; the
in-sample faithfulness is ≥ 1 − τ by construction, this one is not). The unit resampled is the
image with its own noise draw: a resample's loss is the mean of the drawn images' per-image losses
(repeats counted), from the same evaluations as the point estimate (``CircuitLoss.resampled``), and the
mean ablation's reference stays the analysed images' (held-out by default), so a head set that one
search has evaluated costs no other search a forward, and a resample's search evaluates its new sets
on its distinct images only.

Every search of a call — each τ, the necessity checks, the curve, every resample, of every dataset
and window — runs in lockstep (``discovery.lockstep``): each round the next head sets of all of them
are evaluated together, up to ``stack_rows`` rows (images x sets) a forward, so forwards scale with
the longest search rather than with the number of searches; the circuits are those each search finds
run alone (tested). ``lookahead`` > 1 lets searches fill a round's spare rows with their predicted
next evaluations (fewer forwards, more rows: the default on accelerators; on a CPU each row costs its
time, so the default there is 1).

Intervals say what they are: with R ≥ 200 resamples a 2.5–97.5 percentile interval is reported as
a 95 % interval (``*_ci``) when it contains its own estimate; otherwise only the range of the
replicates (``*_range``) is given, with R and a note saying why.

Circuit complexity (the second complexity measure): per window where both datasets have a claimed
circuit, the circuit size at matched gap-normalised faithfulness — the pruned circuit at the primary
τ has faithfulness ≥ 1 − τ by construction, on each dataset's own gap — and the ratio b/a, with
the ratio over the paired bootstrap replicates; also the smallest traced top-k size reaching the
same faithfulness (:func:`circuit_complexity` tabulates them).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import numpy as np
import pandas as pd

from diffcircuit.discovery.circuits import (
    Circuit,
    CircuitLoss,
    GapTest,
    OutOfBag,
    _prefetch,
    circuit_curve,
    gap_test,
    jaccard,
    necessary_heads,
    out_of_bag_faithfulness,
    out_of_bag_requests,
    prune_circuit,
    prune_heads,
)
from diffcircuit.discovery.lockstep import lockstep
from diffcircuit.discovery.loss import STACK_ROWS, evaluate_sets, reference_means
from diffcircuit.errors import ConfigError
from diffcircuit.instrument.registry import HeadRegistry
from diffcircuit.models.diffusion import model_device
from diffcircuit.stats.tests import correct_pvalues

__all__ = [
    "COMPLEXITY_COLUMNS",
    "CURVE_COLUMNS",
    "CircuitRecord",
    "MIN_CI_RESAMPLES",
    "NO_CIRCUIT",
    "PRIMARY_TAU",
    "bootstrap_interval",
    "circuit_complexity",
    "discover_circuits",
    "importance_rows",
    "window_name",
]

PRIMARY_TAU = 0.05
LOOKAHEAD_ACCELERATOR = (
    4  # evaluations a search may ask for ahead, into spare rows, off a CPU (see ``lockstep``)
)
MIN_CI_RESAMPLES = (
    200  # fewer bootstrap replicates: their range is reported, never a "95 % interval"
)
NO_CIRCUIT = "no circuit: ablating every head does not hurt"


@dataclass(frozen=True, kw_only=True)
class CircuitRecord:
    """One dataset x window's circuit, or the claim that there is none (``circuits/<dataset>_t<window>.json``):
    the gap test behind the claim, the heads at the primary τ, their faithfulness and necessity, and their stability
    over image resamples (an interval that says what it is). Fields in the JSON's order; ``to_dict`` is the JSON."""

    dataset: str
    window: str
    timesteps: list[int]
    method: str
    metric: str
    tau: float
    ranking: str
    claimed: bool
    gap: dict  # the one-sided test that ablating every head hurts, with its correction
    loss_full: float
    loss_empty: float
    heads: list[str] | None = None  # None: no circuit claimed
    size: int | None = None
    faithfulness: float | None = None
    recovered_without_circuit: float | None = None
    out_of_bag: dict | None = (
        None  # faithfulness on images each resample's search left out (OutOfBag)
    )
    loss_circuit: float | None = None
    loss_without_circuit: float | None = None
    n_necessary: int | None = None
    necessary: list[str] | None = None
    selection_frequency: dict = field(default_factory=dict)
    boot_sizes: list[int] = field(default_factory=list)
    resamples: int = 0
    size_range: list | None = None
    size_ci: list | None = None
    size_interval: str | None = None
    by_tau: list[dict] = field(default_factory=list)
    topk_size: int | None = None
    claim: str
    overlap_with_other: dict | None = (
        None  # both datasets' circuits in one window: their Jaccard overlap
    )
    complexity: dict | None = None  # ... and their sizes at matched faithfulness
    extra: dict = field(
        default_factory=dict
    )  # keys a newer record has that this version does not name

    @classmethod
    def from_dict(cls, d: dict) -> CircuitRecord:
        known = {f.name for f in fields(cls)} - {"extra"}
        values: dict[str, Any] = {k: v for k, v in d.items() if k in known}
        return cls(**values, extra={k: v for k, v in d.items() if k not in known})

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "extra"} | self.extra


def _finite(x: float | None) -> float | None:
    return None if x is None or x != x else float(x)  # JSON has no NaN


def importance_rows(
    table: pd.DataFrame, *, method: str = "mean", estimator: str | None = None
) -> pd.DataFrame:
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


def bootstrap_interval(
    values: Sequence[float], estimate: float | None
) -> tuple[list | None, list | None, str]:
    """``(range, ci, note)`` of bootstrap replicates: ``range`` = [min, max] of the defined replicates;
    ``ci`` = the 2.5–97.5 percentiles, only with ≥ ``MIN_CI_RESAMPLES`` replicates and when it contains
    ``estimate``; ``note`` says which was given and why."""
    values = [float(v) for v in values if v is not None and v == v]
    r = len(values)
    if r == 0:
        return None, None, "no bootstrap replicates"
    span = [min(values), max(values)]
    if r < MIN_CI_RESAMPLES:
        return (
            span,
            None,
            (
                f"range (min, max) of {r} bootstrap replicates, not a 95 % interval "
                f"(that needs at least {MIN_CI_RESAMPLES})"
            ),
        )
    low, high = (float(v) for v in np.percentile(values, [2.5, 97.5]))
    if estimate is not None and not low <= estimate <= high:
        return (
            span,
            None,
            (
                f"the 95 % percentile interval [{low:.3g}, {high:.3g}] of {r} replicates excludes the "
                f"estimate {estimate:.3g} (the resampled circuits differ systematically), so only the "
                "range is given"
            ),
        )
    return span, [low, high], f"95 % percentile interval over {r} bootstrap replicates"


def _out_of_bag_text(oob: OutOfBag | None) -> str:
    """What the circuit recovers on images its search did not see, or why that is not known."""
    if oob is None or oob.resamples == 0:
        return "out of sample: not estimated (no bootstrap resamples)"
    if oob.faithfulness is None:
        return f"out of sample: not estimated (the left-out images' gap over {oob.resamples} resamples is not positive)"
    return (
        f"out of sample {oob.faithfulness:.2f} of the gap (out-of-bag: {oob.resamples} bootstrap resamples' "
        f"circuits, each found on ~63 % of the images, scored on the ~{oob.images_left_out:.0f} it left out; "
        f"{oob.images_scored} images scored)"
    )


def _claim(test: GapTest, size: int | None, tau: float, oob: OutOfBag | None = None) -> str:
    gap = (
        f"gap {100 * test.relative:+.1f} % of the full model's loss"
        if test.relative is not None
        else f"gap {test.mean:.3g}"
    )
    stats = f"{gap}, one-sided p = {test.p_value:.3g}"
    if test.p_corrected is not None and test.family_size > 1:
        stats += f", q = {test.p_corrected:.3g} ({test.correction} over {test.family_size} dataset x window gap tests)"
    stats += f", n = {test.n_images} images"
    if test.significant:
        return (
            f"circuit: {size} heads recover at least {1 - tau:.0%} of the gap on the images they were found "
            f"on (in-sample, by construction; {_out_of_bag_text(oob)}; the test is the gap's: {stats})"
        )
    if test.q_floor >= test.alpha:
        q = test.p_value if test.p_corrected is None else test.p_corrected
        return (
            f"{NO_CIRCUIT} significantly at this n: q = {q:.3g}; with {test.n_images} images and "
            f"{test.family_size} gap test(s) a lone gap's corrected p cannot go below {test.alpha} "
            f"(smallest {test.q_floor:.3g}; {gap})"
        )
    return f"{NO_CIRCUIT} ({stats})"


def _topk_size(curve: list[dict], faithfulness: float) -> int | None:
    """The smallest traced top-k size whose faithfulness reaches ``faithfulness`` (on the curve's grid)."""
    sizes = [
        p["size"]
        for p in curve
        if p["faithfulness"] == p["faithfulness"] and p["faithfulness"] >= faithfulness
    ]
    return min(sizes) if sizes else None


def _circuit_record(
    base: dict,
    test: GapTest,
    found: dict[float, Circuit],
    necessary: tuple,
    curve: list[dict],
    frequency: dict,
    boot: list,
    oob: OutOfBag | None,
) -> CircuitRecord:
    primary = found[PRIMARY_TAU]
    size = len(primary.heads)
    span, ci, note = bootstrap_interval([float(len(b)) for b in boot], float(size))
    return CircuitRecord(
        **base,
        heads=[str(a) for a in primary.heads],
        size=size,
        faithfulness=_finite(primary.faithfulness),
        recovered_without_circuit=_finite(primary.recovered_without_circuit),
        out_of_bag=None if oob is None else oob.to_dict(),
        loss_circuit=primary.loss_circuit,
        loss_without_circuit=primary.loss_without_circuit,
        n_necessary=len(necessary),
        necessary=[str(a) for a in necessary],
        selection_frequency={str(a): f for a, f in frequency.items() if f > 0},
        boot_sizes=[len(b) for b in boot],
        resamples=len(boot),
        size_range=span,
        size_ci=ci,
        size_interval=note,
        by_tau=[
            {
                "tau": tau,
                "size": len(c.heads),
                "faithfulness": _finite(c.faithfulness),
                "recovered_without_circuit": _finite(c.recovered_without_circuit),
                "loss_circuit": c.loss_circuit,
            }
            for tau, c in found.items()
        ],
        topk_size=_topk_size(curve, 1 - PRIMARY_TAU),
        claim=_claim(test, size, PRIMARY_TAU, oob),
    )


def _pruned(loss, scores: dict, tau: float) -> tuple[Circuit, tuple | None]:
    """The circuit pruned at ``tau`` and, at the primary τ, its individually necessary heads: the circuit's own
    losses and the necessity checks are asked for together, as soon as the search ends."""
    if tau != PRIMARY_TAU:
        return prune_circuit(loss, scores, tau), None
    kept = prune_heads(loss, scores, tau)
    outside = [a for a in loss.heads if a not in kept]
    _prefetch(loss, [list(kept), outside, *([*outside, h] for h in kept)])
    circuit = prune_circuit(loss, scores, tau)
    return circuit, necessary_heads(loss, circuit.heads, tau)


def _unit_jobs(
    x: np.ndarray,
    here: pd.DataFrame,
    draws: list,
    *,
    loss: CircuitLoss,
    registry: HeadRegistry,
    taus: Sequence[float],
) -> tuple[dict, list]:
    """``(scores, jobs)`` for one dataset x window: prune at every τ (with necessity at the primary τ), the curve,
    and the primary τ's pruning on every resample (importance re-estimated on the resampled images)."""
    scores = _importance(here, registry)
    jobs = [(lambda v, tau=tau: _pruned(v, scores, tau), loss) for tau in taus]
    jobs.append((lambda v: circuit_curve(v, scores), loss))
    # each head's mean degradation per image (over the window's timesteps): [targets, images], image i in column i
    per_image = (
        here.groupby(["target", "image"])
        .degradation_pct.mean()
        .unstack("image")
        .reindex(columns=range(len(x)))
    )
    targets, matrix = [registry.parse(t) for t in per_image.index], per_image.to_numpy()
    for draw in draws:  # the same resampled image indices for both datasets
        counts = np.bincount(draw, minlength=len(x))
        scores_b = dict(
            zip(targets, matrix @ counts / counts.sum())
        )  # importance on the resample, repeats counted
        jobs.append((lambda v, s=scores_b: prune_heads(v, s, PRIMARY_TAU), loss.resampled(draw)))
    return scores, jobs


def _unit_record(
    scores: dict,
    results: list,
    *,
    loss: CircuitLoss,
    test: GapTest,
    dataset: str,
    window: list[int],
    registry: HeadRegistry,
    taus: Sequence[float],
    ranking: str,
    metric: str,
    draws: list,
    n_common: int,
):
    """``(rows, record, curve rows, bootstrap circuits or None)`` for one dataset and window from its jobs' results
    (None: no claimed circuit, nothing searched); ``draws`` are the resamples' image indices."""
    name = window_name(window)
    base = {
        "dataset": dataset,
        "window": name,
        "timesteps": window,
        "method": loss.method,
        "metric": metric,
        "tau": PRIMARY_TAU,
        "ranking": ranking,
        "claimed": test.significant,
        "gap": test.to_dict(),
        "loss_full": loss([]),
        "loss_empty": loss(loss.heads),
    }
    heads = [
        {
            "dataset": dataset,
            "window": name,
            "head": str(a),
            "importance_pct": scores.get(a, float("nan")),
            "claimed": test.significant,
        }
        for a in registry
    ]
    if results is None:
        rows = [
            r | {"tau": tau, "in_circuit": False, "selection_frequency": float("nan")}
            for tau in taus
            for r in heads
        ]
        record = CircuitRecord(
            **base, size_interval="no circuit claimed", claim=_claim(test, None, PRIMARY_TAU)
        )
        return rows, record, [], None
    found = {tau: c for tau, (c, _) in zip(taus, results)}
    necessary, curve, boot = (
        results[list(taus).index(PRIMARY_TAU)][1],
        results[len(taus)],
        results[len(taus) + 1 :],
    )
    frequency = {
        a: float(np.mean([a in b for b in boot])) if boot else float("nan") for a in registry
    }
    rows = [
        r
        | {
            "tau": tau,
            "in_circuit": registry.parse(r["head"]) in c.heads,
            "selection_frequency": frequency[registry.parse(r["head"])],
        }
        for tau, c in found.items()
        for r in heads
    ]
    curves = [
        {"dataset": dataset, "window": name, "method": loss.method, "metric": metric, **p}
        for p in curve
    ]
    # the draws are paired across datasets over the first n_common images: those are the pool left out from
    oob = out_of_bag_faithfulness(loss, draws, boot, PRIMARY_TAU, pool=n_common) if boot else None
    record = _circuit_record(base, test, found, necessary, curve, frequency, boot, oob)
    return rows, record, curves, boot


def _gap_tests(losses: dict, *, seed: int, correction: str) -> dict:
    """Every dataset x window's gap test, corrected together: each is a claim that a circuit exists."""
    raw = dict(
        zip(
            losses, lockstep([(lambda v: gap_test(v, seed=seed), loss) for loss in losses.values()])
        )
    )
    q = correct_pvalues([t.p_value for t in raw.values()], correction)
    return {key: t.corrected(qk, len(raw), correction) for (key, t), qk in zip(raw.items(), q)}


def discover_circuits(
    denoiser,
    images: dict[str, np.ndarray],
    importance: pd.DataFrame,
    *,
    registry: HeadRegistry,
    windows: Sequence[Sequence[int]],
    taus: Sequence[float] = (0.02, PRIMARY_TAU, 0.1),
    resamples: int = 3,
    seed: int = 0,
    ranking: str = "exhaustive mean ablation",
    metric: str = "eps",
    progress: Callable[[int], None] | None = None,
    references: dict | None = None,
    correction: str = "fdr_bh",
    test_windows: Sequence[Sequence[int]] | None = None,
    stack_rows: int = STACK_ROWS,
    lookahead: int | None = None,
) -> tuple[pd.DataFrame, list[CircuitRecord], pd.DataFrame]:
    """``(table, circuits, curves)``: one table row per dataset x window x τ x head; one ``CircuitRecord``
    per dataset x window; one curve row per dataset x window x circuit size (claimed circuits only).
    ``windows``: tuples of timesteps (each a window whose losses and importances are averaged).

    ``importance``: per-image single-head degradations (see :func:`importance_rows`); ``ranking``
    names where they came from, for the record. ``metric``: ``"eps"`` or ``"output"`` (see
    :class:`~diffcircuit.discovery.circuits.CircuitLoss`). ``references``: per dataset, the ``ReferenceImages``
    mean ablation takes its means from (the same for every bootstrap resample); None: in-sample means.
    ``correction``: how the dataset x window gap tests are corrected together (``fdr_bh`` or ``holm``);
    ``test_windows`` (default ``windows``): the windows whose gap tests form that family — a superset of
    ``windows``, so that a run discovering one window per task still corrects over all of them.
    ``stack_rows``: rows (images x head sets) per forward, the memory budget (about 5.5 MB a row on the
    embedded model on a CPU); ``lookahead``: see the module docstring (None: 1 on a CPU, else
    ``LOOKAHEAD_ACCELERATOR``). Neither changes a result.
    """
    references = references or {}
    rows, circuits, curves, boot_sets = [], [], [], {}
    n_common = min(len(v) for v in images.values())
    windows = [[int(t) for t in window] for window in windows]
    family = [[int(t) for t in w] for w in (test_windows or windows)]
    if not {tuple(w) for w in windows} <= {tuple(w) for w in family}:
        raise ConfigError("test_windows must include every window discovered")
    # mean ablation's means for every dataset x timestep with a reference, from clean forwards stacked together
    wanted = list(
        dict.fromkeys(
            (d, t) for w in family for d in images for t in w if references.get(d) is not None
        )
    )
    means = dict(
        zip(
            wanted,
            reference_means(
                denoiser,
                registry,
                [(references[d], t) for d, t in wanted],
                seed=seed,
                stack_rows=stack_rows,
            ),
        )
    )
    losses = {
        (d, tuple(w)): CircuitLoss(
            denoiser,
            x,
            timesteps=w,
            dataset=d,
            seed=seed,
            registry=registry,
            metric=metric,
            reference=references.get(d),
            stack_rows=stack_rows,
            means=[means[(d, t)] for t in w] if references.get(d) is not None else None,
        )
        for w in family
        for d, x in images.items()
    }
    tests = _gap_tests(losses, seed=seed, correction=correction)
    units, jobs = [], []  # every claimed dataset x window's searches run in one lockstep
    for window in windows:
        rng = np.random.default_rng(
            [seed, *window]
        )  # per window: one window's draws do not depend on the others
        draws = [rng.integers(0, n_common, n_common) for _ in range(resamples)]
        for dataset, x in images.items():
            here = importance[(importance.dataset == dataset) & importance.timestep.isin(window)]
            key = (dataset, tuple(window))
            scores, unit = _unit_jobs(
                x, here, draws, loss=losses[key], registry=registry, taus=taus
            )
            unit = unit if tests[key].significant else []
            units.append(
                (
                    dataset,
                    window,
                    scores,
                    slice(len(jobs), len(jobs) + len(unit)) if unit else None,
                    draws,
                )
            )
            jobs += unit
    if (
        lookahead is None
    ):  # spare rows cost little time on an accelerator; on a CPU each row costs its time
        lookahead = 1 if model_device(denoiser.network).type == "cpu" else LOOKAHEAD_ACCELERATOR
    results = lockstep(jobs, lookahead=lookahead)
    # every claimed unit's out-of-bag scores: each resample's circuit on the images it left out, stacked together
    evaluate_sets(
        [
            request
            for dataset, window, _, part, draws in units
            if part is not None
            for request in out_of_bag_requests(
                losses[(dataset, tuple(window))], draws, results[part][len(taus) + 1 :], n_common
            )
        ]
    )
    for dataset, window, scores, part, draws in units:
        key = (dataset, tuple(window))
        r, record, curve, boot = _unit_record(
            scores,
            None if part is None else results[part],
            loss=losses[key],
            test=tests[key],
            dataset=dataset,
            window=window,
            registry=registry,
            taus=taus,
            ranking=ranking,
            metric=metric,
            draws=draws,
            n_common=n_common,
        )
        rows, curves = rows + r, curves + curve
        circuits.append(record)
        boot_sets[(dataset, record.window)] = boot
        if progress is not None:
            progress(1)
    circuits = _with_pairs(circuits, boot_sets)
    return pd.DataFrame(rows), circuits, pd.DataFrame(curves, columns=CURVE_COLUMNS)


def _overlap(a: CircuitRecord, b: CircuitRecord, boot_a: list | None, boot_b: list | None) -> dict:
    """Jaccard overlap of two datasets' circuits with its bootstrap interval (null where either has no circuit)."""
    if not (a.claimed and b.claimed):
        missing = " and ".join(c.dataset for c in (a, b) if not c.claimed)
        return {
            "jaccard": None,
            "resamples": 0,
            "resamples_defined": 0,
            "range_low": None,
            "range_high": None,
            "ci_low": None,
            "ci_high": None,
            "interval": f"no overlap: no circuit claimed for {missing}",
            "only_a": [],
            "only_b": [],
        }
    assert a.heads is not None and b.heads is not None  # claimed
    value = _finite(jaccard(a.heads, b.heads))
    boot = [jaccard(x, y) for x, y in zip(boot_a, boot_b)]
    span, ci, note = bootstrap_interval(boot, value)
    return {
        "jaccard": value,
        "resamples": len(boot),
        "resamples_defined": sum(v == v for v in boot),
        "range_low": span and span[0],
        "range_high": span and span[1],
        "ci_low": ci and ci[0],
        "ci_high": ci and ci[1],
        "interval": note,
        "only_a": sorted(set(a.heads) - set(b.heads)),
        "only_b": sorted(set(b.heads) - set(a.heads)),
    }


def _size_ratio(a: CircuitRecord, b: CircuitRecord) -> dict:
    """Circuit size at matched faithfulness (≥ 1 − τ on each dataset's own gap) and its ratio b/a."""
    out = {
        "measure": f"circuit size at faithfulness >= {1 - PRIMARY_TAU:g} (pruned at tau = {PRIMARY_TAU})",
        "faithfulness_target": 1 - PRIMARY_TAU,
    }
    if not (a.claimed and b.claimed):
        missing = " and ".join(c.dataset for c in (a, b) if not c.claimed)
        return out | {"skipped": f"no circuit claimed for {missing}"}
    assert a.size is not None and b.size is not None  # claimed
    ratio = b.size / a.size if a.size else None
    pairs = list(zip(a.boot_sizes, b.boot_sizes))
    boot = [
        sb / sa for sa, sb in pairs if sa > 0 and sb > 0
    ]  # an empty circuit on either side: no ratio
    span, ci, note = bootstrap_interval(boot, ratio)
    if len(boot) < len(pairs):  # the replicates kept are those with a circuit on both sides: say so
        note += (
            f", conditional on a non-empty circuit on both sides ({len(pairs) - len(boot)} of "
            f"{len(pairs)} replicates had an empty one and are left out)"
        )
    top_a, top_b = a.topk_size, b.topk_size
    return out | {
        "size_a": a.size,
        "size_b": b.size,
        "ratio_b_over_a": ratio,
        "ratio_range": span,
        "ratio_ci": ci,
        "ratio_interval": note,
        "resamples": len(boot),
        "resamples_with_an_empty_circuit": len(pairs) - len(boot),
        "topk_size_a": top_a,
        "topk_size_b": top_b,
        "topk_ratio_b_over_a": top_b / top_a if top_a and top_b is not None else None,
    }


def _with_pairs(circuits: list[CircuitRecord], boot_sets: dict) -> list[CircuitRecord]:
    """Per window with both datasets: their overlap and size ratio, added to both circuits."""
    by_window: dict[str, dict[str, int]] = {}
    for i, c in enumerate(circuits):
        by_window.setdefault(c.window, {})[c.dataset] = i
    out = list(circuits)
    for t, pair in by_window.items():
        if set(pair) != {"a", "b"}:
            continue
        a, b = circuits[pair["a"]], circuits[pair["b"]]
        overlap = _overlap(a, b, boot_sets[("a", t)], boot_sets[("b", t)])
        complexity = _size_ratio(a, b)
        for i in pair.values():
            out[i] = replace(out[i], overlap_with_other=overlap, complexity=complexity)
    return out


CURVE_COLUMNS = [
    "dataset",
    "window",
    "method",
    "metric",
    "size",
    "loss_full",
    "loss_empty",
    "loss_circuit",
    "loss_without_circuit",
    "faithfulness",
    "recovered_without_circuit",
]
COMPLEXITY_COLUMNS = [
    "window",
    "timesteps",
    "metric",
    "tau",
    "faithfulness_target",
    "size_a",
    "size_b",
    "ratio_b_over_a",
    "ratio_range_low",
    "ratio_range_high",
    "ratio_ci_low",
    "ratio_ci_high",
    "resamples",
    "topk_size_a",
    "topk_size_b",
    "topk_ratio_b_over_a",
]


def circuit_complexity(circuits: Sequence[CircuitRecord]) -> pd.DataFrame:
    """One row per window where both datasets have a claimed circuit: sizes at matched faithfulness, ratio b/a."""
    rows = []
    for c in circuits:
        k = c.complexity
        if c.dataset != "a" or not k or "skipped" in k:
            continue
        span, ci = k["ratio_range"] or [None, None], k["ratio_ci"] or [None, None]
        rows.append(
            {
                "window": c.window,
                "timesteps": ",".join(map(str, c.timesteps)),
                "metric": c.metric,
                "tau": c.tau,
                "faithfulness_target": k["faithfulness_target"],
                "size_a": k["size_a"],
                "size_b": k["size_b"],
                "ratio_b_over_a": k["ratio_b_over_a"],
                "ratio_range_low": span[0],
                "ratio_range_high": span[1],
                "ratio_ci_low": ci[0],
                "ratio_ci_high": ci[1],
                "resamples": k["resamples"],
                "topk_size_a": k["topk_size_a"],
                "topk_size_b": k["topk_size_b"],
                "topk_ratio_b_over_a": k["topk_ratio_b_over_a"],
            }
        )
    return pd.DataFrame(rows, columns=COMPLEXITY_COLUMNS).astype(
        {c: float for c in COMPLEXITY_COLUMNS[4:]}
    )
