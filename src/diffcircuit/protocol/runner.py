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
    tables/circuits.parquet     per dataset x window x τ x head: in the circuit?, importance, selection frequency
    tables/circuit_curves.parquet  per dataset x window x size k: faithfulness/completeness of the top-k heads
    circuits/<dataset>_t<t>.json  the primary-τ circuit: heads, faithfulness, completeness, overlap with its CI

(``summary.json``, ``report.html`` and ``figures/`` are added from these by ``diffcircuit.report``.)
"""

from __future__ import annotations

import json
import platform
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
from diffcircuit.metrics.observe import observe
from diffcircuit.models.loading import Denoiser, load_denoiser
from diffcircuit.protocol.analyses import derived_tables, seed_quantities
from diffcircuit.protocol.config import RunConfig
from diffcircuit.protocol.store import write_json, write_parquet

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
    manifest = out_dir / "manifest.json"
    if out_dir.exists() and not out_dir.is_dir():
        raise DiffcircuitError(f"--out {out_dir} is a file, not a directory")
    if manifest.exists():
        try:
            old = json.loads(manifest.read_text())["results_key"]
        except (ValueError, KeyError):
            raise DiffcircuitError(f"{manifest} is not a diffcircuit manifest; choose another --out") from None
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
                  "parameters": n_params, "heads": len(registry), "layers": len(registry.layers)},
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


def _observe_all(cfg: RunConfig, den: Denoiser, registry: HeadRegistry, sets: dict[str, ImageSet], progress,
                 *, seed: int | None = None, stage: str = "observe"):
    seed = cfg.seed if seed is None else seed
    step = _stage_progress(progress, stage, sum(len(s) for s in sets.values()) * len(cfg.timesteps))
    heads, images = [], []
    for key, image_set in sets.items():
        h, i = observe(den, image_set.images, timesteps=cfg.timesteps, seed=seed, batch_size=cfg.batch_size,
                       dataset=key, masks=image_set.masks, method=cfg.capture, registry=registry, progress=step)
        heads.append(h)
        images.append(i)
    return pd.concat(heads, ignore_index=True), pd.concat(images, ignore_index=True)


def _ablate_all(cfg: RunConfig, den: Denoiser, registry: HeadRegistry, sets: dict[str, ImageSet], progress):
    """All single-head ablations, every layer and block ablation, and random head sets of the layers' and
    blocks' sizes (the null control), on the first ``ablate_n`` images."""
    plan = [t for level in ("head", "layer", "block") for t in targets(registry, level)]
    sizes = sorted({len(t.heads) for t in plan if t.level in ("layer", "block")})
    plan += [r for k in sizes for r in random_head_sets(registry, k, cfg.null_sets, seed=cfg.seed)]
    n = min(cfg.ablate_n, cfg.n)
    step = _stage_progress(progress, "ablate", len(sets) * n * len(cfg.timesteps))
    frames = [ablation_sweep(den, image_set.images[:n], targets=plan, methods=cfg.ablation_methods,
                             timesteps=cfg.timesteps, seed=cfg.seed, dataset=key, batch_size=cfg.batch_size,
                             registry=registry, progress=step)
              for key, image_set in sets.items()]
    return pd.concat(frames, ignore_index=True)


def _patch_all(cfg: RunConfig, den: Denoiser, registry: HeadRegistry, sets: dict[str, ImageSet], progress):
    """Every head and layer patched from dataset b (source) into dataset a (receiver), pair by pair."""
    plan = [t for level in ("head", "layer") for t in targets(registry, level)]
    n = min(cfg.ablate_n, cfg.n)
    step = _stage_progress(progress, "patch", n * len(cfg.timesteps))
    return activation_patching(den, sets["b"].images[:n], sets["a"].images[:n], targets=plan, timesteps=cfg.timesteps,
                               seed=cfg.seed, batch_size=cfg.batch_size, registry=registry, progress=step)


def _attribute_all(cfg: RunConfig, den: Denoiser, registry: HeadRegistry, sets: dict[str, ImageSet], progress):
    """Attribution scores of every head (first order, IG with 4 steps, first order + Gauss-Newton with
    2 probes), for each ablation method that supports it."""
    n = min(cfg.ablate_n, cfg.n)
    methods = [m for m in cfg.ablation_methods if m in ("zero", "mean")]
    estimators = (dict(ig_steps=0), dict(ig_steps=4), dict(probes=2))
    step = _stage_progress(progress, "attribute", len(sets) * len(methods) * len(estimators))
    frames = []
    for key, image_set in sets.items():
        for method in methods:
            for options in estimators:
                frames.append(attribution_scores(den, image_set.images[:n], timesteps=cfg.timesteps, method=method,
                                                 seed=cfg.seed, dataset=key, batch_size=cfg.batch_size,
                                                 registry=registry, **options))
                step(1)
    return pd.concat(frames, ignore_index=True)


def _discover_all(cfg: RunConfig, den: Denoiser, registry: HeadRegistry, sets: dict[str, ImageSet], ablations, progress):
    n = min(cfg.ablate_n, cfg.n)
    step = _stage_progress(progress, "discover", len(sets) * len(cfg.timesteps))
    return discover_circuits(den, {k: s.images[:n] for k, s in sets.items()}, importance_rows(ablations), registry=registry,
                             windows=[(t,) for t in cfg.timesteps], resamples=cfg.circuit_resamples, seed=cfg.seed, progress=step)


def run_protocol(cfg: RunConfig, out_dir: str | Path, *, progress: Callable[[str, int, int], None] | None = None) -> RunResult:
    """Observe (and ablate) both datasets; write manifest and tables. ``progress(stage, done, total)``."""
    import torch

    out_dir = Path(out_dir)
    _check_out_dir(out_dir, cfg)
    den = load_denoiser(cfg.model, allow_pickle=cfg.allow_pickle, device=cfg.device)
    cfg.check_timesteps(den.scheduler.config.num_train_timesteps)
    size, channels = den.sample_size, den.in_channels
    sets = {key: load_images(spec, n=cfg.n, size=size, channels=channels, seed=cfg.seed, skip_bad=cfg.skip_bad)
            for key, spec in (("a", cfg.data_a), ("b", cfg.data_b))}
    first = torch.from_numpy(sets["a"].images[:1]).to(cfg.device)
    registry = probe_registry(den.network, first, torch.zeros(1, dtype=torch.long, device=cfg.device))
    head_metrics, denoising = _observe_all(cfg, den, registry, sets, progress)
    tables = {"head_metrics": head_metrics, "denoising": denoising}
    if cfg.seed_repeats > 0:  # the same images under other noise draws: how much do the headline numbers move?
        extra = [seed_quantities(_observe_all(cfg, den, registry, sets, progress, seed=cfg.seed + k, stage=f"seed {cfg.seed + k}")[0],
                                 cfg.seed + k) for k in range(1, cfg.seed_repeats + 1)]
        tables["seed_variance"] = pd.concat([seed_quantities(head_metrics, cfg.seed), *extra], ignore_index=True)
    if cfg.ablate_n > 0:
        tables["ablations"] = _ablate_all(cfg, den, registry, sets, progress)
        tables["patching"] = _patch_all(cfg, den, registry, sets, progress)
        tables["attribution"] = _attribute_all(cfg, den, registry, sets, progress)
    circuits = []
    if cfg.ablate_n > 0 and "mean" in cfg.ablation_methods:
        tables["circuits"], circuits, tables["circuit_curves"] = _discover_all(cfg, den, registry, sets, tables["ablations"],
                                                                                progress)
    tables |= derived_tables(head_metrics, tables.get("ablations"), seed=cfg.seed, correction=cfg.correction)
    for name, table in tables.items():
        write_parquet(out_dir / "tables" / f"{name}.parquet", table)
    for circuit in circuits:
        write_json(out_dir / "circuits" / f"{circuit['dataset']}_t{circuit['window']}.json", circuit)
    manifest = _manifest(cfg, den, registry, sets)
    write_json(out_dir / "manifest.json", manifest)
    return RunResult(out_dir=out_dir, manifest=manifest, head_metrics=head_metrics, denoising=denoising)
