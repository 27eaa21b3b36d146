"""The pieces a run is split into (shards), and how each is computed, whichever backend runs it.

A ``Task`` names its shard (file stem and parts), its stage, what it is worth in progress units
and its arguments: plain values, so that it pickles to a Ray worker on another machine. ``Context``
is what computing needs (config, model, head registry, both image sets); the local backend builds
one, a Ray worker builds its own once (``Context.build``) and keeps it for every task it runs.
``compute`` returns the shard's parts by name; the backend writes them through the shard store.

Shards: observation per dataset x timestep x slice of ``shard_images`` images (so no process ever
holds one stage's rows for all images), ablations per dataset x timestep, patching per timestep,
attribution per dataset x method x estimator, discovery per timestep.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from diffcircuit.data.spec import ImageSet
from diffcircuit.instrument.cost import count_forwards
from diffcircuit.instrument.registry import HeadRegistry
from diffcircuit.interventions.ablation import Target, distinct_targets, random_head_sets, targets
from diffcircuit.interventions.attribution import attribution_scores
from diffcircuit.interventions.patching import activation_patching
from diffcircuit.interventions.sweep import ReferenceImages, ablation_sweep
from diffcircuit.metrics.observe import observe, observe_with_null
from diffcircuit.models.loading import Denoiser
from diffcircuit.protocol.circuits import discover_circuits
from diffcircuit.protocol.config import RunConfig
from diffcircuit.protocol.datasets import load_datasets
from diffcircuit.protocol.roles import null_blocks, permutation_table, shard_slices
from diffcircuit.protocol.setup import build_setup

__all__ = [
    "ATTRIBUTION_ESTIMATORS",
    "WORK",
    "Context",
    "Task",
    "ablate_tasks",
    "ablation_plan",
    "attribute_tasks",
    "compute",
    "discover_work",
    "discover_tasks",
    "null_set_counts",
    "observe_tasks",
    "patch_tasks",
]

ATTRIBUTION_ESTIMATORS = (
    dict(ig_steps=0),
    dict(ig_steps=4),
    dict(probes=1),
)  # IG: the joint (all-heads) path


@dataclass(frozen=True, eq=False)
class Task:
    """One shard: ``stage`` computes it from ``args``; its files are ``<name>.<part>`` for each part."""

    stage: str
    name: str
    parts: tuple[str, ...]  # "heads.parquet" (a table) or "circuits.json" (JSON)
    units: int  # progress units (images or pieces) it is worth
    label: str  # the progress bar it advances
    args: dict = field(default_factory=dict)
    work: float = (
        0.0  # its cost in plain image forwards, estimated: what the run's overall ETA weighs it by
    )

    @property
    def files(self) -> tuple[str, ...]:
        """Every part written: the results, and ``cost.json`` (forwards, images through them, seconds)."""
        return (*self.parts, "cost.json")


@dataclass(eq=False)
class Context:
    """What computing a shard needs; built once per process."""

    cfg: RunConfig
    den: Denoiser
    registry: HeadRegistry
    sets: dict[str, ImageSet]
    captions: dict[str, str | None] = field(
        default_factory=dict
    )  # per dataset: how its captions were used

    @classmethod
    def build(cls, cfg: RunConfig) -> Context:
        """Load the model and both image sets of ``cfg`` and probe the head registry (inputs are checked here)."""
        setup = build_setup(
            cfg,
            timesteps=cfg.timesteps,
            images=lambda den: load_datasets(den, cfg),
            captions=cfg.captions,
        )
        return cls(
            cfg=cfg,
            den=setup.den,
            registry=setup.registry,
            sets=setup.sets,
            captions=setup.captions,
        )

    @property
    def n_ablate(self) -> int:
        return min(self.cfg.ablate_n, self.cfg.n)

    def references(self, key: str) -> list[ReferenceImages] | None:
        """Mean ablation's reference for dataset ``key`` (``mean_reference``): "heldout", the next ``n_ablate``
        images of the same dataset after the evaluated ones (fewer when n < 2·ablate_n); "pooled", those of both
        datasets; "insample" (None), the evaluated images themselves."""
        if self.cfg.mean_reference == "insample":
            return None
        lo, hi = self.n_ablate, min(self.cfg.n, 2 * self.n_ablate)
        keys = [key] if self.cfg.mean_reference == "heldout" else list(self.sets)
        return [
            ReferenceImages(
                dataset=k, images=np.asarray(self.sets[k].images[lo:hi]), index=np.arange(lo, hi)
            )
            for k in keys
        ]

    def autocast(self):
        """Mixed precision for the forward passes when the config asks (statistics stay fp32)."""
        return self.cfg.autocast()


def observe_tasks(
    ctx: Context, *, seed: int, label: str = "observe", null: bool = False
) -> list[Task]:
    """Observation shards: whole role-null blocks of at least ``shard_images`` images; ``null``: with the role null
    (its permutation sums in ``null.parquet``)."""
    cfg = ctx.cfg
    parts = ("heads.parquet", "images.parquet") + (("null.parquet",) if null else ())
    per_image = WORK["observe_null" if null else "observe"]
    return [
        Task(
            "observe",
            f"observe_s{seed}_{key}_t{t}_{lo}-{hi}",
            parts,
            units=hi - lo,
            label=label,
            args=dict(key=key, t=t, seed=seed, lo=lo, hi=hi, null=null),
            work=(hi - lo) * per_image,
        )
        for key, s in ctx.sets.items()
        for t in cfg.timesteps
        for lo, hi in shard_slices(len(s), cfg.shard_images, cfg.role_null_block)
    ]


def ablate_tasks(ctx: Context) -> list[Task]:
    plan, _ = ablation_plan(ctx.registry, null_sets=ctx.cfg.null_sets, seed=ctx.cfg.seed)
    work = ctx.n_ablate * len(plan) * len(ctx.cfg.ablation_methods) * WORK["ablate"]
    return [
        Task(
            "ablate",
            f"ablate_{key}_t{t}",
            ("table.parquet",),
            units=ctx.n_ablate,
            label="ablate",
            args=dict(key=key, t=t),
            work=work,
        )
        for key in ctx.sets
        for t in ctx.cfg.timesteps
    ]


def patch_tasks(ctx: Context) -> list[Task]:
    work = (
        ctx.n_ablate
        * (len(targets(ctx.registry, "head")) + len(ctx.registry.layers))
        * WORK["patch"]
    )
    return [
        Task(
            "patch",
            f"patch_t{t}",
            ("table.parquet",),
            units=ctx.n_ablate,
            label="patch",
            args=dict(t=t),
            work=work,
        )
        for t in ctx.cfg.timesteps
    ]


def attribute_tasks(ctx: Context) -> list[Task]:
    """First order, IG with 4 steps and first order + Gauss-Newton with 1 probe, for zero and mean ablation."""
    methods = [m for m in ctx.cfg.ablation_methods if m in ("zero", "mean")]
    return [
        Task(
            "attribute",
            f"attribute_{key}_{method}_" + "_".join(f"{k}{v}" for k, v in options.items()),
            ("table.parquet",),
            units=1,
            label="attribute",
            args=dict(key=key, method=method, options=options),
            work=ctx.n_ablate
            * len(ctx.cfg.timesteps)
            * WORK["attribute"]
            * (1 + options.get("ig_steps", 0)),
        )
        for key in ctx.sets
        for method in methods
        for options in ATTRIBUTION_ESTIMATORS
    ]


def discover_tasks(ctx: Context, importance: pd.DataFrame) -> list[Task]:
    """One circuit search per timestep, ranked by the ablation sweep's ``importance`` rows."""
    return [
        Task(
            "discover",
            f"discover_t{t}",
            ("circuits.parquet", "curves.parquet", "circuits.json"),
            units=len(ctx.sets),
            label="discover",
            args=dict(t=t, importance=importance[importance.timestep == t]),
            work=discover_work(ctx),
        )
        for t in ctx.cfg.timesteps
    ]


# Cost per unit in plain image forwards, for the overall ETA only (never for results): measured on the default
# run (2 CPU cores): an observed image with the role null costs ~5 plain forwards, one without ~1; an ablation
# variant of one image ~0.65 (prefix reuse); a patched head ~0.5; attribution ~1.5 per image and path step; a
# timestep's circuit searches (benchmarks/discovery_cost.py) ~1.2 image forwards per head and image, plus ~0.17
# per bootstrap resample.
WORK = {
    "observe_null": 5.0,
    "observe": 1.0,
    "ablate": 0.65,
    "patch": 0.5,
    "attribute": 1.5,
    "discover": 1.2,
    "discover_resample": 0.17,
}


def discover_work(ctx: Context) -> float:
    """The estimated cost of one timestep's circuit searches (both datasets), in plain image forwards."""
    per_head_image = WORK["discover"] + WORK["discover_resample"] * ctx.cfg.circuit_resamples
    return per_head_image * len(ctx.registry) * ctx.n_ablate * len(ctx.sets)


def null_set_counts(plan: list[Target], null_sets: int) -> dict[int, int]:
    """Random sets per head count: at least ``null_sets``, and at least 20·m for a size that a level of m components
    uses, so that one component beating every set (rank p = 1/(R + 1)) can reach q < 0.05 after correction over
    its level (m/(R + 1) < 0.05)."""
    counts: dict[int, int] = {}
    for level in ("layer", "block"):
        members = [t for t in plan if t.level == level]
        for size in {len(t.heads) for t in members}:
            counts[size] = max(counts.get(size, 0), null_sets, 20 * len(members))
    return dict(sorted(counts.items()))


def ablation_plan(
    registry: HeadRegistry, *, null_sets: int, seed: int
) -> tuple[list[Target], dict[str, tuple[str, ...]]]:
    """Every single head, every distinct layer and block (a block that is one layer is tested once, as the
    layer; its name is kept among the aliases), all heads at once, and random head sets of each size the
    distinct layers and blocks have (only those: the null costs one forward per set and method), as many as
    ``null_set_counts`` says."""
    named = [t for level in ("head", "layer", "block") for t in targets(registry, level)]
    plan, aliases = distinct_targets(named)
    counts = null_set_counts(plan, null_sets)
    plan += targets(registry, "all")
    return plan + [
        r for k, count in counts.items() for r in random_head_sets(registry, k, count, seed=seed)
    ], aliases


def compute(
    ctx: Context, task: Task, progress: Callable[[int], None] | None = None
) -> dict[str, object]:
    """The shard's parts by name (tables or JSON values) and its ``cost.json``. ``progress(k)`` reports images
    done, where known."""
    with count_forwards(ctx.den.network) as cost, ctx.autocast():
        values = _COMPUTE[task.stage](ctx, progress, **task.args)
    return values | {"cost.json": cost.to_dict()}


def _observe(
    ctx: Context, progress, *, key: str, t: int, seed: int, lo: int, hi: int, null: bool = False
) -> dict:
    cfg, s = ctx.cfg, ctx.sets[key]
    common = dict(
        timesteps=[t],
        seed=seed,
        batch_size=cfg.batch_size,
        dataset=key,
        masks=None if s.masks is None else s.masks[lo:hi],
        method=cfg.capture,
        registry=ctx.registry,
        progress=progress,
        first=lo,
        pictures=None if s.pixels is None else s.pixels[lo:hi],
    )
    if not null:
        heads, images = observe(ctx.den, s.images[lo:hi], **common)
        return {"heads.parquet": heads, "images.parquet": images}
    blocks = [
        (b_lo - lo, b_hi - lo)
        for b_lo, b_hi in null_blocks(len(s), cfg.role_null_block)
        if lo <= b_lo < hi
    ]
    found = observe_with_null(ctx.den, s.images[lo:hi], blocks=blocks, **common)
    perms = permutation_table(
        found.blocks, seed=seed, dataset=key, n_permutations=cfg.role_permutations
    )
    return {"heads.parquet": found.heads, "images.parquet": found.images, "null.parquet": perms}


def _ablate(ctx: Context, progress, *, key: str, t: int) -> dict:
    cfg = ctx.cfg
    plan, aliases = ablation_plan(ctx.registry, null_sets=cfg.null_sets, seed=cfg.seed)
    table = ablation_sweep(
        ctx.den,
        ctx.sets[key].images[: ctx.n_ablate],
        targets=plan,
        methods=cfg.ablation_methods,
        timesteps=[t],
        seed=cfg.seed,
        dataset=key,
        batch_size=cfg.batch_size,
        registry=ctx.registry,
        progress=progress,
        reference=ctx.references(key),
    )
    table["also_named"] = table.target.map(
        lambda name: ",".join(aliases.get(name, ()))
    )  # the same heads, other names
    return {"table.parquet": table}


def _patch(ctx: Context, progress, *, t: int) -> dict:
    """Every head and layer patched from dataset b (source) into dataset a (receiver), pair by pair."""
    plan = [target for level in ("head", "layer") for target in targets(ctx.registry, level)]
    n = ctx.n_ablate
    return {
        "table.parquet": activation_patching(
            ctx.den,
            ctx.sets["b"].images[:n],
            ctx.sets["a"].images[:n],
            targets=plan,
            timesteps=[t],
            seed=ctx.cfg.seed,
            batch_size=ctx.cfg.batch_size,
            registry=ctx.registry,
            progress=progress,
        )
    }


def _attribute(ctx: Context, progress, *, key: str, method: str, options: dict) -> dict:
    cfg = ctx.cfg
    table = attribution_scores(
        ctx.den,
        ctx.sets[key].images[: ctx.n_ablate],
        timesteps=cfg.timesteps,
        method=method,
        seed=cfg.seed,
        dataset=key,
        batch_size=cfg.batch_size,
        registry=ctx.registry,
        reference=ctx.references(key),
        **options,
    )
    if progress is not None:
        progress(1)
    return {"table.parquet": table}


def _discover(ctx: Context, progress, *, t: int, importance: pd.DataFrame) -> dict:
    cfg, n = ctx.cfg, ctx.n_ablate
    table, circuits, curves = discover_circuits(
        ctx.den,
        {k: s.images[:n] for k, s in ctx.sets.items()},
        importance,
        registry=ctx.registry,
        windows=[(t,)],
        resamples=cfg.circuit_resamples,
        taus=cfg.circuit_taus,
        seed=cfg.seed,
        metric=cfg.circuit_metric,
        progress=progress,
        references={k: ctx.references(k) for k in ctx.sets},
        correction=cfg.correction,  # over every timestep's gap tests
        test_windows=[(int(s),) for s in cfg.timesteps],
    )
    return {
        "circuits.parquet": table,
        "curves.parquet": curves,
        "circuits.json": [c.to_dict() for c in circuits],  # the JSON edge
    }


_COMPUTE = {
    "observe": _observe,
    "ablate": _ablate,
    "patch": _patch,
    "attribute": _attribute,
    "discover": _discover,
}
