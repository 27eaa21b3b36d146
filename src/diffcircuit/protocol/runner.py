"""The main job: observe a denoiser on two image distributions and write the run directory.

Everything that can be wrong with the inputs (model, data specs, timesteps, an existing run of
another config in the directory) is checked before anything is written; files are written
atomically, so a failed run leaves no half-written table behind.

Run directory::

    manifest.json               config, package versions, seed, model path, dataset sizes/fingerprints
    tables/head_metrics.parquet one row per dataset x image x timestep x head
    tables/denoising.parquet    one row per dataset x image x timestep
    tables/head_summary.parquet per dataset x timestep x head x metric: mean over images, 95 % CI
    tables/head_roles.parquet   one row per timestep x head: mean probe scores and the head's role
    tables/divergence.parquet   per timestep: synthetic-vs-natural JSD of head entropies, CI, null
    tables/divergence_heads.parquet  per timestep x head: that head's JSD
    tables/ablations.parquet    per target x method x dataset x timestep x image: paired ε/x₀ errors
    tables/patching.parquet     per head/layer x timestep x pair: b's activation patched into a
    tables/attribution.parquet  per head x method x estimator x dataset x timestep x image: predicted degradation
    tables/complexity.parquet   per complexity measure: a, b, ratio b/a with CI and permutation p
    tables/tests.parquet        every hypothesis test: statistic, p, BH-corrected p, effect size, n
    tables/critical.parquet     every head/layer/block ablation against random heads of the same count
    tables/seed_variance.parquet  headline quantities under other noise seeds (same images)
    tables/gallery.parquet      attention maps of a few heads (most focal, most important) on a few images
    tables/gallery_images.parquet  those images (for the report's overlays)
    tables/circuits.parquet     per dataset x window x τ x head: in the circuit?, importance, selection frequency
    tables/circuit_curves.parquet  per dataset x window x size k: faithfulness/completeness of the top-k heads
    circuits/<dataset>_t<t>.json  the primary-τ circuit: heads, faithfulness, completeness, overlap with its CI

    run.json                    written first: claims the directory for this config (another config is refused)
    run.log                     what ran, when, how long; which shards were computed and which resumed
    shards/                     the finished pieces (per stage x dataset x timestep); re-running the same
                                command resumes from them, and a run killed at any moment (SIGKILL included)
                                then ends with the same tables and summary as an uninterrupted one

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

import pandas as pd

from diffcircuit.data.spec import ImageSet, load_images
from diffcircuit.discovery.run import discover_circuits, importance_rows
from diffcircuit.errors import DiffcircuitError
from diffcircuit.instrument.registry import HeadRegistry
from diffcircuit.instrument.session import probe_registry
from diffcircuit.interventions.ablation import random_head_sets, targets
from diffcircuit.interventions.attribution import attribution_scores
from diffcircuit.interventions.patching import activation_patching
from diffcircuit.interventions.sweep import ablation_sweep
from diffcircuit.metrics.gallery import attention_maps, object_queries
from diffcircuit.metrics.observe import observe
from diffcircuit.models.loading import Denoiser, load_unconditional
from diffcircuit.protocol.analyses import derived_tables, seed_quantities
from diffcircuit.protocol.config import RunConfig
from diffcircuit.protocol.store import Shards, write_json, write_parquet

__all__ = ["RunResult", "run_protocol"]


@dataclass(frozen=True, kw_only=True, eq=False)
class RunResult:
    out_dir: Path
    manifest: dict
    head_metrics: pd.DataFrame
    denoising: pd.DataFrame


def _versions() -> dict:
    import diffusers
    import numpy
    import torch

    from diffcircuit._version import __version__

    return {"diffcircuit": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "numpy": numpy.__version__}


def _check_out_dir(out_dir: Path, cfg: RunConfig) -> None:
    """The directory must be new, or hold (part of) a run of the same config: then the run resumes."""
    if out_dir.exists() and not out_dir.is_dir():
        raise DiffcircuitError(f"--out {out_dir} is a file, not a directory")
    for claim in (out_dir / "run.json", out_dir / "manifest.json"):
        if claim.exists():
            try:
                old = json.loads(claim.read_text())["results_key"]
            except (ValueError, KeyError):
                raise DiffcircuitError(f"{claim} is not a diffcircuit run file; choose another --out") from None
            if old != cfg.results_key():
                raise DiffcircuitError(f"{out_dir} holds a run with a different config; choose another --out")


def _manifest(cfg: RunConfig, den: Denoiser, registry: HeadRegistry, sets: dict[str, ImageSet]) -> dict:
    n_params = sum(p.numel() for p in den.network.parameters())
    return {
        "config": cfg.to_dict(),
        "results_key": cfg.results_key(),
        "versions": _versions(),
        "seed": cfg.seed,
        "model": {"source": den.source, "model_path": str(den.model_path), "class": type(den.network).__name__,
                  "parameters": n_params, "heads": len(registry), "layers": len(registry.layers),
                  "weights_sha256": den.weights_sha256(), "prediction_type": den.prediction_type},
        "datasets": {k: {"spec": s.spec, "n": len(s), "fingerprint": s.fingerprint} for k, s in sets.items()},
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
    """What every stage needs: the config, model, registry, datasets, shards and progress."""

    cfg: RunConfig
    den: Denoiser
    registry: HeadRegistry
    sets: dict[str, ImageSet]
    shards: Shards
    progress: Callable[[str, int, int], None] | None

    @property
    def n_ablate(self) -> int:
        return min(self.cfg.ablate_n, self.cfg.n)


def _observe_all(job: _Job, *, seed: int | None = None, stage: str = "observe"):
    """Head and image tables of both datasets; one shard per dataset x timestep."""
    cfg = job.cfg
    seed = cfg.seed if seed is None else seed
    step = _stage_progress(job.progress, stage, sum(len(s) for s in job.sets.values()) * len(cfg.timesteps))
    heads, images = [], []
    for key, image_set in job.sets.items():
        for t in cfg.timesteps:
            h, i = job.shards.frames(
                f"observe_s{seed}_{key}_t{t}", ["heads", "images"],
                lambda key=key, image_set=image_set, t=t: observe(
                    job.den, image_set.images, timesteps=[t], seed=seed, batch_size=cfg.batch_size, dataset=key,
                    masks=image_set.masks, method=cfg.capture, registry=job.registry, progress=step),
                on_resume=lambda image_set=image_set: step(len(image_set)))
            heads.append(h)
            images.append(i)
    return pd.concat(heads, ignore_index=True), pd.concat(images, ignore_index=True)


def _ablation_plan(job: _Job) -> list:
    """All single heads, every layer and block, and random head sets of the layers' and blocks' sizes."""
    plan = [t for level in ("head", "layer", "block") for t in targets(job.registry, level)]
    sizes = sorted({len(t.heads) for t in plan if t.level in ("layer", "block")})
    return plan + [r for k in sizes for r in random_head_sets(job.registry, k, job.cfg.null_sets, seed=job.cfg.seed)]


def _ablate_all(job: _Job):
    """The ablation plan on the first ``ablate_n`` images of each dataset; one shard per dataset x timestep."""
    cfg, n, plan = job.cfg, job.n_ablate, _ablation_plan(job)
    step = _stage_progress(job.progress, "ablate", len(job.sets) * n * len(cfg.timesteps))
    frames = [job.shards.frame(f"ablate_{key}_t{t}",
                               lambda key=key, image_set=image_set, t=t: ablation_sweep(
                                   job.den, image_set.images[:n], targets=plan, methods=cfg.ablation_methods, timesteps=[t],
                                   seed=cfg.seed, dataset=key, batch_size=cfg.batch_size, registry=job.registry,
                                   progress=step),
                               on_resume=lambda: step(n))
              for key, image_set in job.sets.items() for t in cfg.timesteps]
    return pd.concat(frames, ignore_index=True)


def _patch_all(job: _Job):
    """Every head and layer patched from dataset b (source) into dataset a (receiver), pair by pair."""
    cfg, n = job.cfg, job.n_ablate
    plan = [t for level in ("head", "layer") for t in targets(job.registry, level)]
    step = _stage_progress(job.progress, "patch", n * len(cfg.timesteps))
    frames = [job.shards.frame(f"patch_t{t}",
                               lambda t=t: activation_patching(
                                   job.den, job.sets["b"].images[:n], job.sets["a"].images[:n], targets=plan, timesteps=[t],
                                   seed=cfg.seed, batch_size=cfg.batch_size, registry=job.registry, progress=step),
                               on_resume=lambda: step(n))
              for t in cfg.timesteps]
    return pd.concat(frames, ignore_index=True)


ATTRIBUTION_ESTIMATORS = (dict(ig_steps=0), dict(ig_steps=4), dict(probes=1))


def _attribute_all(job: _Job):
    """Attribution scores of every head (first order, IG with 4 steps, first order + Gauss-Newton with
    1 probe), for each ablation method that supports it; one shard per dataset x method x estimator."""
    cfg, n = job.cfg, job.n_ablate
    methods = [m for m in cfg.ablation_methods if m in ("zero", "mean")]
    step = _stage_progress(job.progress, "attribute", len(job.sets) * len(methods) * len(ATTRIBUTION_ESTIMATORS))
    frames = []
    for key, image_set in job.sets.items():
        for method in methods:
            for options in ATTRIBUTION_ESTIMATORS:
                name = "_".join(f"{k}{v}" for k, v in options.items())
                frames.append(job.shards.frame(
                    f"attribute_{key}_{method}_{name}",
                    lambda image_set=image_set, method=method, options=options, key=key: attribution_scores(
                        job.den, image_set.images[:n], timesteps=cfg.timesteps, method=method, seed=cfg.seed,
                        dataset=key, batch_size=cfg.batch_size, registry=job.registry, **options)))
                step(1)
    return pd.concat(frames, ignore_index=True)


def _discover_all(job: _Job, ablations: pd.DataFrame):
    """Circuits per timestep window (one shard each): table, curves and the circuits' JSON."""
    cfg, n = job.cfg, job.n_ablate
    step = _stage_progress(job.progress, "discover", len(job.sets) * len(cfg.timesteps))
    importance = importance_rows(ablations)
    tables, curves, circuits = [], [], []
    for t in cfg.timesteps:
        found: list = []

        def compute(t=t, found=found):
            if not found:
                found.extend(discover_circuits(job.den, {k: s.images[:n] for k, s in job.sets.items()}, importance,
                                               registry=job.registry, windows=[(t,)], resamples=cfg.circuit_resamples,
                                               taus=cfg.circuit_taus,
                                               seed=cfg.seed, progress=step))
            return found

        table, curve = job.shards.frames(f"discover_t{t}", ["circuits", "curves"], lambda: [compute()[0], compute()[2]],
                                         on_resume=lambda: step(len(job.sets)))
        circuits += job.shards.json(f"discover_t{t}.circuits", lambda: compute()[1])
        tables.append(table)
        curves.append(curve)
    return pd.concat(tables, ignore_index=True), circuits, pd.concat(curves, ignore_index=True)


def _gallery_heads(job: _Job, heads: pd.DataFrame, ablations: pd.DataFrame | None, t: int, k: int = 2) -> list:
    """The most focal heads (lowest normalised entropy) and the most important (largest single-head zero
    ablation effect; else the most uniform), at timestep ``t``."""
    entropy = heads[heads.timestep == t].groupby(["layer", "head"], sort=False).entropy_norm.mean().sort_values()
    chosen = [f"{layer}:{head}" for layer, head in entropy.index[:k]]
    if ablations is not None and ((ablations.level == "head") & (ablations.method == "zero")).any():
        rows = ablations[(ablations.level == "head") & (ablations.method == "zero") & (ablations.timestep == t)]
        ranked = rows.groupby("target").degradation_pct.mean().sort_values(ascending=False).index
    else:
        ranked = [f"{layer}:{head}" for layer, head in entropy.index[::-1]]
    chosen += [a for a in ranked if a not in chosen][:k]
    return [job.registry.parse(a) for a in chosen]


def _gallery(job: _Job, heads: pd.DataFrame, ablations: pd.DataFrame | None, n_images: int = 3):
    """Attention maps of a few heads on a few images per dataset (the middle analysed timestep), and those images."""
    t = job.cfg.timesteps[len(job.cfg.timesteps) // 2]
    chosen = _gallery_heads(job, heads, ablations, t)

    def compute():
        maps, pictures = [], []
        for key, image_set in job.sets.items():
            x = image_set.images[:n_images]
            masks = None if image_set.masks is None else image_set.masks[:n_images]
            maps.append(attention_maps(job.den, x, heads=chosen, timestep=t, seed=job.cfg.seed, dataset=key,
                                       queries=object_queries(masks, len(x), x.shape[-1])))
            pictures += [{"dataset": key, "image": i, "size": int(x.shape[-1]), "channels": int(x.shape[1]),
                          "pixels": x[i].reshape(-1).astype("float32")} for i in range(len(x))]
        return [pd.concat(maps, ignore_index=True), pd.DataFrame(pictures)]

    return job.shards.frames("gallery", ["maps", "images"], compute)


def run_protocol(cfg: RunConfig, out_dir: str | Path, *, progress: Callable[[str, int, int], None] | None = None) -> RunResult:
    """Observe (and ablate) both datasets; write manifest and tables. ``progress(stage, done, total)``."""
    import torch

    out_dir = Path(out_dir)
    _check_out_dir(out_dir, cfg)
    den = load_unconditional(cfg.model, allow_pickle=cfg.allow_pickle, device=cfg.device)
    cfg.check_timesteps(den.scheduler.config.num_train_timesteps)
    size, channels = den.sample_size, den.in_channels
    sets = {key: load_images(spec, n=cfg.n, size=size, channels=channels, seed=cfg.seed, skip_bad=cfg.skip_bad)
            for key, spec in (("a", cfg.data_a), ("b", cfg.data_b))}
    first = torch.from_numpy(sets["a"].images[:1]).to(cfg.device)
    registry = probe_registry(den.network, first, torch.zeros(1, dtype=torch.long, device=cfg.device))
    # inputs are valid: from here on the directory is this run's (run.json claims it for this config)
    write_json(out_dir / "run.json", {"results_key": cfg.results_key()})
    for stale in out_dir.rglob(".*.tmp"):  # writes a killed run never finished: never read, so remove them
        stale.unlink(missing_ok=True)
    log = logging.getLogger("diffcircuit.run")
    log.setLevel(logging.INFO)
    handler = logging.FileHandler(out_dir / "run.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    try:
        return _run_stages(cfg, out_dir, den, registry, sets, log, progress)
    except BaseException as exc:
        log.error("stopped: %s: %s", type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        raise
    finally:
        log.removeHandler(handler)
        handler.close()


def _run_stages(cfg: RunConfig, out_dir: Path, den: Denoiser, registry: HeadRegistry, sets: dict[str, ImageSet],
                log: logging.Logger, progress) -> RunResult:
    start = time.perf_counter()
    log.info("run started: model %s, datasets %s, %s images each, timesteps %s, seed %d", den.source,
             {k: s.spec for k, s in sets.items()}, cfg.n, list(cfg.timesteps), cfg.seed)
    job = _Job(cfg=cfg, den=den, registry=registry, sets=sets, shards=Shards(out_dir / "shards", log), progress=progress)
    head_metrics, denoising = _observe_all(job)
    tables = {"head_metrics": head_metrics, "denoising": denoising}
    if cfg.seed_repeats > 0:  # the same images under other noise draws: how much do the headline numbers move?
        extra = [seed_quantities(_observe_all(job, seed=cfg.seed + k, stage=f"seed {cfg.seed + k}")[0], cfg.seed + k)
                 for k in range(1, cfg.seed_repeats + 1)]
        tables["seed_variance"] = pd.concat([seed_quantities(head_metrics, cfg.seed), *extra], ignore_index=True)
    if cfg.runs("ablation"):
        tables["ablations"] = _ablate_all(job)
    if cfg.runs("patching"):
        tables["patching"] = _patch_all(job)
    if cfg.runs("attribution"):
        tables["attribution"] = _attribute_all(job)
    circuits = []
    if cfg.runs("discovery"):
        tables["circuits"], circuits, tables["circuit_curves"] = _discover_all(job, tables["ablations"])
    tables["gallery"], tables["gallery_images"] = _gallery(job, head_metrics, tables.get("ablations"))
    tables |= derived_tables(head_metrics, tables.get("ablations"), seed=cfg.seed, correction=cfg.correction)
    for name, table in tables.items():
        write_parquet(out_dir / "tables" / f"{name}.parquet", table)
    for circuit in circuits:
        write_json(out_dir / "circuits" / f"{circuit['dataset']}_t{circuit['window']}.json", circuit)
    manifest = _manifest(cfg, den, registry, sets)
    write_json(out_dir / "manifest.json", manifest)
    log.info("run finished in %.1f s: %d shards computed, %d resumed from disk", time.perf_counter() - start,
             job.shards.computed, job.shards.resumed)
    return RunResult(out_dir=out_dir, manifest=manifest, head_metrics=head_metrics, denoising=denoising)
