"""The main job: observe a denoiser on two image distributions and write the run directory.

Everything that can be wrong with the inputs (model, data specs, timesteps, an existing run of
another config in the directory) is checked before anything is written; files are written
atomically, so a failed run leaves no half-written table behind.

Run directory::

    manifest.json               config, package versions, seed, model path, dataset sizes/fingerprints, how each
                                dataset was rendered and how many of its images the model was trained on; ``cost``:
                                per stage, forward calls (full or partial), images through them, seconds, shards
    tables/datasets.parquet     per image property (colour, edges, texture, intensity): both datasets' means, d, p
    tables/head_metrics.parquet one row per dataset x image x timestep x head
    tables/denoising.parquet    one row per dataset x image x timestep
    tables/head_summary.parquet per dataset x timestep x head x metric: mean over images, 95 % CI
    tables/role_tests.parquet   per dataset x timestep x head x content probe: excess over the null with CI, p, q
    tables/head_roles.parquet   one row per dataset x timestep x head: mean probe scores, tests and the head's role
    tables/divergence.parquet   per timestep: entropy difference b − a averaged over heads (CI, p), heads that
                                differ, null-corrected Wasserstein-1 divergence (p), legacy 10-bin JSD
    tables/divergence_heads.parquet  per timestep x head: its entropy difference (CI, p, BH q), W1, legacy JSD
    tables/ablations.parquet    per target x method x dataset x timestep x image: paired ε/x₀ errors
    tables/patching.parquet     per head/layer x timestep x pair: b's activation patched into a
    tables/attribution.parquet  per head x method x estimator x dataset x timestep x image: predicted degradation
    tables/complexity.parquet   per complexity measure x timestep (and pooled): a, b, ratio b/a with CI,
                                permutation p, p floor and the smallest detectable ratio
    tables/tests.parquet        every hypothesis test: statistic, p, BH-corrected p, effect size, n
    tables/critical.parquet     every distinct head/layer/block ablation against the random head sets of its size
    tables/seed_variance.parquet  headline quantities under other noise seeds (same images)
    tables/gallery.parquet      attention maps of a few heads (most focal, most important) on a few images
    tables/gallery_images.parquet  those images (for the report's overlays)
    tables/token_maps.parquet   text-conditioned models: per image x timestep x cross-attention head x prompt token,
                                the token's attention map on the layer's grid (DAAM-style)
    tables/token_heatmaps.parquet  per image x token: those maps upsampled and averaged over layers, heads, timesteps
    tables/circuits.parquet     per dataset x window x τ x head: in the circuit?, importance, selection frequency
    tables/circuit_curves.parquet  per dataset x window x size k: faithfulness/recovered_without_circuit of the top-k heads
    tables/circuit_complexity.parquet  per timestep: circuit sizes at matched faithfulness and their ratio b/a
    circuits/<dataset>_t<t>.json  the primary-τ circuit, or the claim that there is none: gap test, losses, heads,
                                  faithfulness, recovered_without_circuit, necessary heads, overlap

    run.json                    written first: claims the directory for this config (another config is refused)
    run.log                     what ran, when, how long; which shards were computed and which resumed
    shards/                     the finished pieces (``protocol.tasks``: observation per dataset x timestep x
                                image slice, interventions per dataset x timestep ...); re-running the same
                                command resumes from them, and a run killed at any moment (SIGKILL included)
                                then ends with the same tables and summary as an uninterrupted one. Shards
                                are computed in this process or by Ray workers (``protocol.backends``)

(``summary.json``, ``report.html`` and ``figures/`` are added from these by ``diffcircuit.report``.)
"""

from __future__ import annotations

import json
import logging
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar, overload

import pandas as pd

from diffcircuit._threads import set_threads, threads_restored
from diffcircuit.data.provenance import in_training_set
from diffcircuit.errors import InputError
from diffcircuit.instrument.cost import count_forwards
from diffcircuit.metrics.gallery import attention_maps, object_queries, token_heatmaps, token_maps
from diffcircuit.protocol.analyses import derived_tables, seed_quantities
from diffcircuit.protocol.backends import LocalBackend, RayBackend, make_backend
from diffcircuit.protocol.circuits import CircuitRecord, circuit_complexity, importance_rows
from diffcircuit.protocol.config import RunConfig
from diffcircuit.protocol.datasets import datasets_table, training_overlap
from diffcircuit.protocol.store import (
    Shards,
    check_writable,
    claim_directory,
    write_json,
    write_parquet,
)
from diffcircuit.protocol.tasks import (
    Context,
    Task,
    ablate_tasks,
    attribute_tasks,
    discover_tasks,
    discover_work,
    observe_tasks,
    patch_tasks,
)

__all__ = ["ProtocolRun", "run_protocol"]

Finished = TypeVar("Finished")  # what run_protocol's finish step returns


@dataclass(frozen=True, kw_only=True, eq=False)
class ProtocolRun:
    """The run directory as the protocol left it: manifest and tables, before the summary and the report
    (``report.finalize_run`` turns it into the user's ``RunResult``)."""

    out_dir: Path
    manifest: dict
    head_metrics: pd.DataFrame
    denoising: pd.DataFrame


def _versions() -> dict:
    import diffusers
    import numpy
    import torch

    from diffcircuit._version import __version__

    return {
        "diffcircuit": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "numpy": numpy.__version__,
    }


def _check_out_dir(out_dir: Path, cfg: RunConfig) -> None:
    """The directory must be new, or hold (part of) a run of the same config: then the run resumes."""
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"out {out_dir} is a file, not a directory", "out")
    check_writable(out_dir)
    for claim in (out_dir / "run.json", out_dir / "manifest.json"):
        if claim.exists():
            try:
                old = json.loads(claim.read_text())["results_key"]
            except (ValueError, KeyError):
                raise InputError(
                    f"{claim} is not a diffcircuit run file; choose another out", "out"
                ) from None
            if old != cfg.results_key():
                raise InputError(
                    f"{out_dir} holds a run with a different config; choose another out", "out"
                )


def _latent(den) -> dict | None:
    """A latent model's autoencoder: what the images went through before the network saw them."""
    codec = den.codec
    if codec is None:
        return None
    return {
        "autoencoder": type(codec.vae).__name__,
        "scaling_factor": codec.scale,
        "shift_factor": codec.shift,
        "pixels_per_latent": codec.factor,
        "image_size": den.image_size,
        "encoding": "posterior mean",
    }


def _training_data(record: dict | None) -> dict:
    """What the model's ``training_data.json`` says (or that it has none)."""
    if record is None:
        return {
            "record": None,
            "complete": False,
            "note": "the model folder has no training_data.json: unknown",
        }
    return {
        "record": "training_data.json",
        "complete": bool(record.get("complete")),
        "composition": record.get("composition"),
        "sources": record.get("sources", []),
        "note": record.get("note"),
    }


def _manifest(ctx: Context) -> dict:
    cfg, den, registry, sets = ctx.cfg, ctx.den, ctx.registry, ctx.sets
    n_params = sum(p.numel() for p in den.network.parameters())
    overlap, record = training_overlap(den, sets, cfg.seed)
    return {
        "config": cfg.to_dict(),
        "results_key": cfg.results_key(),
        "versions": _versions(),
        "seed": cfg.seed,
        "device": cfg.torch_device,
        "model": {
            "source": den.source,
            "model_path": str(den.model_path),
            "class": type(den.network).__name__,
            "parameters": n_params,
            "heads": len(registry),
            "layers": len(registry.layers),
            "weights_sha256": den.weights_sha256(),
            "prediction_type": den.prediction_type,
            "conditioning": den.conditioning.description if den.conditioning else None,
            "process": den.process,
            "latent": _latent(den),
        },
        "datasets": {
            k: {
                "spec": s.spec,
                "n": len(s),
                "fingerprint": s.fingerprint,
                "captions": ctx.captions.get(k),
                "rendering": s.rendering,
                "in_training_set": overlap[k],
                "intervened_in_training_set": in_training_set(
                    record, s.spec, n=ctx.n_ablate, seed=cfg.seed
                ),
            }
            for k, s in sets.items()
        },
        "training_data": _training_data(record),
        "layers": [info.to_dict() for info in registry.layers],
    }


def _stage_progress(progress, stage: str, total: int) -> Callable[[int], None]:
    done = 0

    def step(k: int) -> None:
        nonlocal done
        done += k
        if progress is not None:
            progress(stage, done, total)

    return step


@dataclass
class _Job:
    """What every stage needs: the computing context, the shard store, the backend and progress."""

    ctx: Context
    shards: Shards
    backend: LocalBackend | RayBackend
    progress: Callable[[str, int, int], None] | None
    total_work: float = (
        0.0  # the whole run's estimated work (plain image forwards): the overall bar's total
    )
    done_work: float = 0.0

    def run(self, tasks: list[Task]) -> None:
        """Compute the shards of ``tasks`` that are not on disk yet (one progress bar per label, and the overall
        one, weighted by each task's estimated work)."""
        totals: dict[str, int] = {}
        for task in tasks:
            totals[task.label] = totals.get(task.label, 0) + task.units
        steps = {
            label: _stage_progress(self.progress, label, total) for label, total in totals.items()
        }

        def advance(task: Task, k: int) -> None:
            steps[task.label](k)
            self.done_work += task.work * k / max(task.units, 1)
            if self.progress is not None and self.total_work > 0:
                self.progress(OVERALL, round(self.done_work), round(self.total_work))

        self.backend.run(tasks, self.shards, advance)

    def cost(self, tasks: list[Task]) -> dict[str, dict]:
        """Per progress label: forward calls, images through them and seconds, summed over the tasks' shards
        (a resumed shard's as measured when it was computed), and how many shards."""
        out: dict[str, dict] = {}
        for task in tasks:
            spent = self.shards.read(task.name, ["cost.json"])["cost.json"]
            entry = out.setdefault(
                task.label, {"forward_calls": 0, "image_forwards": 0, "seconds": 0.0, "shards": 0}
            )
            for key in ("forward_calls", "image_forwards", "seconds"):
                entry[key] += spent[key]
            entry["shards"] += 1
        return {label: e | {"seconds": round(e["seconds"], 1)} for label, e in out.items()}

    def table(self, tasks: list[Task], part: str) -> pd.DataFrame:
        """One part of every task's shard, read back from disk and concatenated in task order."""
        return pd.concat(
            [self.shards.read(task.name, [part])[part] for task in tasks], ignore_index=True
        )


def _gallery_heads(
    ctx: Context, heads: pd.DataFrame, ablations: pd.DataFrame | None, t: int, k: int = 2
) -> list:
    """The most focal heads (lowest normalised entropy) and the most important (largest single-head zero
    ablation effect; else the most uniform), at timestep ``t``, among self- and joint-attention heads on a grid."""
    on_grid = [
        i.layer
        for i in ctx.registry.layers  # maps are drawn for self/joint attention over a square query grid
        if i.kind in ("self", "joint")
        and i.query_grid
        and i.query_grid[0] == i.query_grid[1]
        and (i.kind == "joint" or i.query_grid[0] * i.query_grid[1] == i.n_keys)
    ]
    heads = heads[heads.layer.isin(on_grid)]
    if ablations is not None:
        ablations = ablations[ablations.layer.isin(on_grid)]
    entropy = (
        heads[heads.timestep == t]
        .groupby(["layer", "head"], sort=False)
        .entropy_norm.mean()
        .sort_values()
    )
    chosen = [f"{layer}:{head}" for layer, head in entropy.index[:k]]
    if ablations is not None and ((ablations.level == "head") & (ablations.method == "zero")).any():
        rows = ablations[
            (ablations.level == "head") & (ablations.method == "zero") & (ablations.timestep == t)
        ]
        ranked = rows.groupby("target").degradation_pct.mean().sort_values(ascending=False).index
    else:
        ranked = [f"{layer}:{head}" for layer, head in entropy.index[::-1]]
    chosen += [a for a in ranked if a not in chosen][:k]
    return [ctx.registry.parse(a) for a in chosen]


def _gallery(job: _Job, heads: pd.DataFrame, ablations: pd.DataFrame | None, n_images: int = 3):
    """Attention maps of a few heads on a few images per dataset (the middle analysed timestep), and those images."""
    ctx = job.ctx
    t = ctx.cfg.timesteps[len(ctx.cfg.timesteps) // 2]
    chosen = _gallery_heads(ctx, heads, ablations, t)

    def compute():
        maps, pictures = [], []
        for key, image_set in ctx.sets.items():
            x, shown = (
                image_set.images[:n_images],
                image_set.pictures[:n_images],
            )  # model input; pixels
            masks = None if image_set.masks is None else image_set.masks[:n_images]
            with ctx.autocast():
                maps.append(
                    attention_maps(
                        ctx.den,
                        x,
                        heads=chosen,
                        timestep=t,
                        seed=ctx.cfg.seed,
                        dataset=key,
                        queries=object_queries(masks, len(x), shown.shape[-1]),
                    )
                )
            pictures += [
                {
                    "dataset": key,
                    "image": i,
                    "size": int(shown.shape[-1]),
                    "channels": int(shown.shape[1]),
                    "pixels": shown[i].reshape(-1).astype("float32"),
                }
                for i in range(len(x))
            ]
        return [pd.concat(maps, ignore_index=True), pd.DataFrame(pictures)]

    return job.shards.frames("gallery", ["maps", "images"], compute)


def _token_maps(job: _Job, n_images: int = 3):
    """DAAM-style maps of the prompt's tokens in every cross-attention head, on a few images per dataset at
    every timestep, and their aggregate over layers, heads and timesteps; None without cross-attention."""
    ctx = job.ctx
    cond = ctx.den.conditioning
    if (
        cond is None
        or not cond.tokens
        or not any(i.kind in ("cross", "joint") for i in ctx.registry.layers)
    ):
        return None

    def tokens(key: str):  # a captioned dataset's images each have their own prompt
        own = ctx.den.caption_tokens(key)
        return cond.tokens if own is None else own[:n_images]

    def compute():
        with ctx.autocast():
            maps = pd.concat(
                [
                    token_maps(
                        ctx.den,
                        s.images[:n_images],
                        registry=ctx.registry,
                        tokens=tokens(key),
                        timesteps=ctx.cfg.timesteps,
                        seed=ctx.cfg.seed,
                        dataset=key,
                    )
                    for key, s in ctx.sets.items()
                ],
                ignore_index=True,
            )
        return [maps, token_heatmaps(maps, ctx.den.image_size)]

    return job.shards.frames("token_maps", ["maps", "heatmaps"], compute)


@overload
def run_protocol(
    cfg: RunConfig,
    out_dir: str | Path,
    *,
    progress: Callable[[str, int, int], None] | None = None,
    finish: None = None,
) -> ProtocolRun: ...
@overload
def run_protocol(
    cfg: RunConfig,
    out_dir: str | Path,
    *,
    progress: Callable[[str, int, int], None] | None = None,
    finish: Callable[[Path], Finished],
) -> Finished: ...
def run_protocol(cfg, out_dir, *, progress=None, finish=None):
    """Observe (and intervene on) both datasets; write manifest and tables. ``progress(stage, done, total)``.
    ``finish(out_dir)`` (e.g. ``report.finalize_run``: summary and report) runs while the directory is still
    this run's, and its result is returned."""
    with threads_restored():  # the config's thread count holds for this run only
        set_threads(cfg.threads)
        return _run_protocol(cfg, Path(out_dir), progress, finish)


def _run_protocol(cfg: RunConfig, out_dir: Path, progress, finish=None) -> ProtocolRun:
    _check_out_dir(out_dir, cfg)
    ctx = Context.build(cfg)
    # inputs are valid: the directory is this process's while it runs (a second run there is refused)
    with claim_directory(out_dir):
        _check_out_dir(
            out_dir, cfg
        )  # again, under the lock: another run may have claimed it meanwhile
        result = _claimed_run(ctx, out_dir, progress)
        return finish(result.out_dir) if finish is not None else result


def _claimed_run(ctx: Context, out_dir: Path, progress) -> ProtocolRun:
    cfg = ctx.cfg
    # from here on the directory is this run's (run.json claims it for this config)
    write_json(out_dir / "run.json", {"results_key": cfg.results_key()})
    for stale in out_dir.rglob(
        ".*.tmp"
    ):  # writes a killed run never finished: never read, so remove them
        stale.unlink(missing_ok=True)
    log = logging.getLogger("diffcircuit.run")
    log.setLevel(logging.INFO)
    handler = logging.FileHandler(out_dir / "run.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    backend = None
    try:
        backend = make_backend(ctx, log)
        job = _Job(
            ctx=ctx, shards=Shards(out_dir / "shards", log), backend=backend, progress=progress
        )
        return _run_stages(job, out_dir, log)
    except BaseException as exc:
        log.error(
            "stopped: %s: %s", type(exc).__name__, str(exc).splitlines()[0] if str(exc) else ""
        )
        raise
    finally:
        if backend is not None:
            backend.close()
        log.removeHandler(handler)
        handler.close()


def _run_stages(job: _Job, out_dir: Path, log: logging.Logger) -> ProtocolRun:
    ctx, cfg = job.ctx, job.ctx.cfg
    start = time.perf_counter()
    log.info(
        "run started: model %s, datasets %s, %s images each, timesteps %s, seed %d, backend %s, device %s",
        ctx.den.source,
        {k: s.spec for k, s in ctx.sets.items()},
        cfg.n,
        list(cfg.timesteps),
        cfg.seed,
        cfg.backend,
        cfg.torch_device,
    )
    observed = observe_tasks(ctx, seed=cfg.seed, null=True)
    repeats = [
        observe_tasks(ctx, seed=cfg.seed + k, label=f"seed {cfg.seed + k}")
        for k in range(1, cfg.seed_repeats + 1)
    ]
    groups = {
        name: make(ctx)
        for name, make in (
            ("ablations", ablate_tasks),
            ("patching", patch_tasks),
            ("attribution", attribute_tasks),
        )
        if cfg.runs(_ANALYSIS[name])
    }
    first = (
        observed
        + [t for tasks in repeats for t in tasks]
        + [t for tasks in groups.values() for t in tasks]
    )
    job.total_work = sum(t.work for t in first) + (
        discover_work(ctx) * len(cfg.timesteps) if cfg.runs("discovery") else 0.0
    )
    job.run(
        observed
        + [t for tasks in repeats for t in tasks]
        + [t for tasks in groups.values() for t in tasks]
    )
    head_metrics = job.table(observed, "heads.parquet")
    tables = {"head_metrics": head_metrics, "denoising": job.table(observed, "images.parquet")}
    if repeats:  # the same images under other noise draws: how much do the headline numbers move?
        tables["seed_variance"] = pd.concat(
            [seed_quantities(head_metrics, cfg.seed)]
            + [
                seed_quantities(job.table(tasks, "heads.parquet"), tasks[0].args["seed"])
                for tasks in repeats
            ],
            ignore_index=True,
        )
    tables |= {name: job.table(tasks, "table.parquet") for name, tasks in groups.items()}
    circuits, found = [], []
    if cfg.runs("discovery"):
        found = discover_tasks(ctx, importance_rows(tables["ablations"]))
        job.run(found)
        tables["circuits"], tables["circuit_curves"] = (
            job.table(found, "circuits.parquet"),
            job.table(found, "curves.parquet"),
        )
        circuits = [
            CircuitRecord.from_dict(c)
            for task in found
            for c in job.shards.read(task.name, ["circuits.json"])["circuits.json"]
        ]
        tables["circuit_complexity"] = circuit_complexity(circuits)
    cost = job.cost(
        observed
        + [t for tasks in repeats for t in tasks]
        + [t for ts in groups.values() for t in ts]
        + found
    )
    with count_forwards(ctx.den.network) as maps:
        tables["gallery"], tables["gallery_images"] = _gallery(
            job, head_metrics, tables.get("ablations")
        )
        tokens = _token_maps(job)
    cost["attention maps (this invocation)"] = maps.to_dict()
    tables["datasets"] = datasets_table(ctx.sets, seed=cfg.seed, correction=cfg.correction)
    if tokens is not None:
        tables["token_maps"], tables["token_heatmaps"] = tokens
    permutations = {
        key: job.table([t for t in observed if t.args["key"] == key], "null.parquet")
        for key in ctx.sets
    }
    with count_forwards(ctx.den.network) as statistics:
        tables |= derived_tables(
            head_metrics,
            tables.get("ablations"),
            seed=cfg.seed,
            correction=cfg.correction,
            role_permutations=permutations,
            denoising=tables["denoising"],
        )
    cost["statistics (this invocation)"] = statistics.to_dict()
    for name, table in tables.items():
        write_parquet(out_dir / "tables" / f"{name}.parquet", table)
    for circuit in circuits:
        write_json(
            out_dir / "circuits" / f"{circuit.dataset}_t{circuit.window}.json", circuit.to_dict()
        )
    manifest = _manifest(ctx) | {"cost": cost}
    for label, spent in cost.items():
        log.info(
            "cost: %s: %d forward calls, %d image forwards, %.1f s",
            label,
            spent["forward_calls"],
            spent["image_forwards"],
            spent["seconds"],
        )
    write_json(out_dir / "manifest.json", manifest)
    log.info(
        "run finished in %.1f s: %d shards computed, %d resumed from disk",
        time.perf_counter() - start,
        job.shards.computed,
        job.shards.resumed,
    )
    return ProtocolRun(
        out_dir=out_dir, manifest=manifest, head_metrics=head_metrics, denoising=tables["denoising"]
    )


_ANALYSIS = {"ablations": "ablation", "patching": "patching", "attribution": "attribution"}
OVERALL = "overall"  # the progress label of the whole run's bar (its ETA weighs stages by their estimated work)
