"""``diffcircuit discover``: minimal circuits for one or two distributions, without the rest of the protocol.

Heads are ranked by attribution (first order + Gauss-Newton term, mean ablation: one forward and
two backwards per batch; ``ig_steps`` adds integrated gradients) or by the exhaustive single-head mean-ablation sweep, then pruned
ACDC-style at several τ (fractions of the gap L_empty − L_full, on the ε-MSE or, with
``metric="output"``, on the distance to the full model's output), traced along circuit size, and
rerun on bootstrap resamples of the images; where the gap is not significantly positive no circuit
is claimed. As in ``run``: the synthetic set is rendered gray when the other set is grayscale
(``synthetic_color``), and mean ablation's mean comes from held-out images of the same dataset (the
``n`` images after the evaluated ones; ``mean_reference``: "pooled" over both datasets, or "insample").
Head roles (from one observation pass) colour the circuit figure.

Output directory::

    discover.json                  the config, the model path, the datasets (rendering, images the model
                                   trained on) and the circuits' headline
    circuits/<dataset>_t<window>.json  the primary-τ circuit (or the claim that there is none) per dataset
                                   and window (``t500``, ``t100-300``): gap test, losses, heads, necessity
    tables/importance.parquet      per dataset x timestep x image x head: the ranking's degradation
    tables/circuits.parquet        per dataset x window x τ x head: claimed, in circuit, importance, selection frequency
    tables/circuit_curves.parquet  per dataset x window x size: faithfulness and recovered_without_circuit of the
                                   top-k heads (claimed circuits only)
    tables/circuit_complexity.parquet  per window: circuit sizes at matched faithfulness and their ratio b/a
    tables/head_roles.parquet      per timestep x head: probe scores and role
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from diffcircuit.discovery.circuits import METRICS
from diffcircuit.errors import ConfigError, DiffcircuitError
from diffcircuit.interventions.ablation import targets
from diffcircuit.interventions.attribution import attribution_scores
from diffcircuit.interventions.sweep import ablation_sweep
from diffcircuit.metrics.observe import observe_with_null
from diffcircuit.models.spec import MODEL_HELP, ModelSpec
from diffcircuit.protocol.circuits import (
    PRIMARY_TAU,
    CircuitRecord,
    circuit_complexity,
    discover_circuits,
    importance_rows,
    window_name,
)
from diffcircuit.protocol.config import MEAN_REFERENCES, SYNTHETIC_COLORS, RunConfig, not_results
from diffcircuit.protocol.datasets import load_datasets, reference_split, training_overlap
from diffcircuit.protocol.roles import (
    head_roles_table,
    null_blocks,
    permutation_table,
    role_tests_table,
)
from diffcircuit.protocol.setup import build_setup
from diffcircuit.protocol.store import check_writable, claim_command, write_json, write_parquet

__all__ = ["DISCOVER_HELP", "RANKINGS", "DiscoverConfig", "DiscoveryResult", "run_discovery"]

RANKINGS = ("attribution", "exhaustive")


@dataclass(frozen=True, kw_only=True)
class DiscoverConfig(ModelSpec):
    """``diffcircuit discover``: the model (``ModelSpec``'s fields), one or two datasets, ranking and search."""

    data_a: str = "synthetic"
    data_b: str | None = "faces"  # None: one distribution only (no overlap)
    n: int = 16
    timesteps: tuple[int, ...] = (100, 500, 900)
    windows: tuple[tuple[int, ...], ...] = ()  # timestep windows; () = each timestep its own window
    seed: int = 0
    batch_size: int = 50
    ranking: str = "attribution"
    probes: int = 1  # Gauss-Newton probes of the attribution ranking
    ig_steps: int = 0  # > 0: integrated gradients with this many steps (with or without probes)
    taus: tuple[float, ...] = (0.02, PRIMARY_TAU, 0.1)
    resamples: int = 10  # bootstrap resamples of the images at the primary τ
    metric: str = (
        "eps"  # circuit loss: "eps" (ε-MSE) or "output" (distance to the full model's ε̂, as ACDC)
    )
    synthetic_color: str = "auto"  # as in `run`: gray when the other set is grayscale
    match_histogram: bool = (
        False  # match each synthetic image's luminance histogram to the other set's
    )
    mean_reference: str = "heldout"  # mean ablation's reference: "heldout", "pooled" or "insample"

    def __post_init__(self):
        super().__post_init__()
        if self.ranking not in RANKINGS:
            raise ConfigError(
                f"ranking must be one of {', '.join(RANKINGS)}, not {self.ranking!r}", "ranking"
            )
        if (
            self.n < 2
            or self.batch_size < 1
            or self.resamples < 0
            or self.probes < 0
            or self.ig_steps < 0
        ):
            raise ConfigError(
                "need n >= 2, batch_size >= 1, resamples >= 0, probes >= 0 and ig_steps >= 0",
                "n",
                "batch_size",
                "resamples",
                "probes",
                "ig_steps",
            )
        if self.ig_steps and self.probes:
            raise ConfigError(
                "ig_steps and probes are alternatives (integrated gradients already include the "
                "curvature along their path); give one of them",
                "ig_steps",
                "probes",
            )
        if not self.taus or any(not 0 < t < 1 for t in self.taus):
            raise ConfigError(
                f"every τ in taus must be a fraction of the gap L_empty − L_full in (0, 1); got "
                f"{list(self.taus)}",
                "taus",
            )
        if PRIMARY_TAU not in self.taus:
            raise ConfigError(f"taus must include the primary τ {PRIMARY_TAU}", "taus")
        if self.metric not in METRICS:
            raise ConfigError(
                f"metric must be one of {', '.join(METRICS)}, not {self.metric!r}", "metric"
            )
        if any(not w or not set(w) <= set(self.timesteps) for w in self.windows):
            raise ConfigError(
                "every window in windows must be a non-empty set of the analysed timesteps",
                "windows",
                "timesteps",
            )
        if self.synthetic_color not in SYNTHETIC_COLORS:
            raise ConfigError(
                f"synthetic_color must be one of {', '.join(SYNTHETIC_COLORS)}, not "
                f"{self.synthetic_color!r}",
                "synthetic_color",
            )
        if self.match_histogram and [self.data_a, self.data_b].count("synthetic") != 1:
            raise ConfigError(
                "match_histogram matches the synthetic set to the other dataset: exactly one of "
                "data_a and data_b must be 'synthetic'",
                "match_histogram",
                "data_a",
                "data_b",
            )
        if self.mean_reference not in MEAN_REFERENCES:
            raise ConfigError(
                f"mean_reference must be one of {', '.join(MEAN_REFERENCES)}, not "
                f"{self.mean_reference!r}",
                "mean_reference",
            )


# each DiscoverConfig field in a line: the help of the flag that sets it (``diffcircuit discover``)
DISCOVER_HELP = MODEL_HELP | {
    "data_a": "'synthetic', 'faces', 'nonfaces' or an image folder",
    "data_b": "second distribution, or 'none' for one distribution only",
    "n": "images per distribution",
    "timesteps": "comma-separated timesteps",
    "windows": "timesteps pooled into one window, e.g. 100,300 (repeatable; none: each timestep alone)",
    "seed": "noise seed; same seed, same results",
    "batch_size": "images per forward pass (does not change results)",
    "ranking": "'attribution' (gradients, fast) or 'exhaustive' (one forward per head)",
    "probes": "Gauss-Newton probes of the attribution ranking (0 with --ig-steps)",
    "ig_steps": "integrated-gradient steps of the attribution ranking (0: first order)",
    "taus": "comma-separated fractions of the gap L_empty - L_full; must include 0.05",
    "resamples": "bootstrap resamples of the images (stability, CIs)",
    "metric": "'eps' (ε-MSE) or 'output' (distance to the full model's ε̂, as ACDC)",
    "synthetic_color": "auto (gray when the other set is grayscale), color or gray",
    "match_histogram": "match each synthetic image's luminance histogram to the other set's",
    "mean_reference": "mean ablation's reference: heldout (the n images after the evaluated ones), pooled "
    "(both sets' held-out) or insample",
}


@dataclass(frozen=True, kw_only=True)
class DiscoveryResult:
    circuits: list[CircuitRecord]
    table: pd.DataFrame
    curves: pd.DataFrame
    roles: pd.DataFrame
    labels: dict[str, str]  # dataset key -> data spec


def _rank(
    cfg: DiscoverConfig, den, registry, key: str, images, progress, reference
) -> pd.DataFrame:
    if cfg.ranking == "attribution":
        scores = attribution_scores(
            den,
            images,
            timesteps=cfg.timesteps,
            method="mean",
            probes=cfg.probes,
            ig_steps=cfg.ig_steps,
            seed=cfg.seed,
            dataset=key,
            batch_size=cfg.batch_size,
            registry=registry,
            reference=reference,
        )
        return importance_rows(scores, estimator=scores.estimator.iloc[0])
    table = ablation_sweep(
        den,
        images,
        targets=targets(registry, "head"),
        methods=["mean"],
        timesteps=cfg.timesteps,
        seed=cfg.seed,
        dataset=key,
        batch_size=cfg.batch_size,
        registry=registry,
        progress=progress,
        reference=reference,
    )
    return importance_rows(table)


def _ranking_name(cfg: DiscoverConfig) -> str:
    if cfg.ranking == "exhaustive":
        return "exhaustive mean ablation"
    if cfg.ig_steps:
        return f"attribution: integrated gradients ({cfg.ig_steps} steps), mean ablation"
    if cfg.probes:
        return f"attribution: first order + Gauss-Newton ({cfg.probes} probe{'s' if cfg.probes > 1 else ''}), mean ablation"
    return "attribution: first order, mean ablation"


def _finished(out: Path, windows, labels: dict[str, str]) -> DiscoveryResult:
    """A finished discovery's result, read back from its directory (circuits in the order they were found:
    window by window, dataset by dataset)."""
    order = {window_name(w): i for i, w in enumerate(windows)}
    circuits = sorted(
        (
            CircuitRecord.from_dict(json.loads(p.read_text()))
            for p in (out / "circuits").glob("*.json")
        ),
        key=lambda c: (order.get(c.window, len(order)), c.dataset),
    )
    tables = {
        name: pd.read_parquet(out / "tables" / f"{name}.parquet")
        for name in ("circuits", "circuit_curves", "head_roles")
    }
    return DiscoveryResult(
        circuits=circuits,
        table=tables["circuits"],
        curves=tables["circuit_curves"],
        roles=tables["head_roles"],
        labels=labels,
    )


def run_discovery(
    cfg: DiscoverConfig,
    out_dir: str | Path,
    *,
    progress: Callable[[str, int, int], None] | None = None,
) -> DiscoveryResult:
    """Rank, prune, trace and resample; write the output directory (see the module docstring)."""
    check_writable(Path(out_dir))
    n_load = cfg.n if cfg.mean_reference == "insample" else 2 * cfg.n

    def image_sets(den):  # with a held-out reference, the n images after the evaluated ones too
        try:
            return load_datasets(den, cfg, n=n_load)
        except DiffcircuitError as err:
            if n_load == cfg.n:
                raise
            raise ConfigError(
                f"{err} (the held-out mean reference needs 2 x n images: lower n or set "
                "mean_reference insample)",
                "n",
                "mean_reference",
            ) from None

    setup = build_setup(cfg, timesteps=cfg.timesteps, images=image_sets)
    den, registry, captions = setup.den, setup.registry, setup.captions
    specs = {"a": cfg.data_a} | ({"b": cfg.data_b} if cfg.data_b else {})
    sets, references = reference_split(setup.sets, cfg.n, cfg.mean_reference)
    references = references or {}
    in_training, _ = training_overlap(den, sets, cfg.seed)

    def stage(name: str, total: int) -> Callable[[int], None]:
        done = [0]

        def step(k: int) -> None:
            done[0] += k
            if progress is not None:
                progress(name, done[0], total)

        return step

    windows = cfg.windows or tuple((t,) for t in cfg.timesteps)
    with (
        claim_command(
            Path(out_dir), "discover", asdict(cfg), ignore=not_results(cfg.precision)
        ) as finished,
        setup.autocast(),
    ):  # the inputs are valid: ours now
        if finished:  # the same config finished here: its results, read back
            return _finished(Path(out_dir), windows, specs)
        observe_step = stage("observe", len(sets) * cfg.n * len(cfg.timesteps))
        found = {
            k: observe_with_null(
                den,
                s.images,
                timesteps=cfg.timesteps,
                seed=cfg.seed,
                batch_size=cfg.batch_size,
                dataset=k,
                masks=s.masks,
                registry=registry,
                progress=observe_step,
                pictures=s.pixels,
                blocks=null_blocks(len(s), RunConfig().role_null_block),
            )
            for k, s in sets.items()
        }
        heads = pd.concat([f.heads for f in found.values()], ignore_index=True)
        perms = {
            k: permutation_table(
                f.blocks, seed=cfg.seed, dataset=k, n_permutations=RunConfig().role_permutations
            )
            for k, f in found.items()
        }
        roles = head_roles_table(heads, role_tests_table(heads, perms, seed=cfg.seed))
        rank_step = stage(f"rank ({cfg.ranking})", len(sets) * cfg.n * len(cfg.timesteps))
        importance = []
        for key, image_set in sets.items():
            importance.append(
                _rank(cfg, den, registry, key, image_set.images, rank_step, references.get(key))
            )
            if cfg.ranking == "attribution":
                rank_step(cfg.n * len(cfg.timesteps))
        importance = pd.concat(importance, ignore_index=True)
        table, circuits, curves = discover_circuits(
            den,
            {k: s.images for k, s in sets.items()},
            importance,
            registry=registry,
            windows=windows,
            taus=cfg.taus,
            resamples=cfg.resamples,
            seed=cfg.seed,
            progress=stage("discover", len(sets) * len(windows)),
            ranking=_ranking_name(cfg),
            metric=cfg.metric,
            references=references,
            correction="fdr_bh",
        )
        out = Path(out_dir)
        for name, frame in (
            ("importance", importance),
            ("circuits", table),
            ("circuit_curves", curves),
            ("head_roles", roles),
            ("circuit_complexity", circuit_complexity(circuits)),
        ):
            write_parquet(out / "tables" / f"{name}.parquet", frame)
        for c in circuits:
            write_json(out / "circuits" / f"{c.dataset}_t{c.window}.json", c.to_dict())
        write_json(
            out / "discover.json",
            {
                "config": asdict(cfg),
                "finished": True,
                "model_path": str(den.model_path),
                "conditioning": den.conditioning.description if den.conditioning else None,
                "datasets": {
                    k: {
                        "spec": s.spec,
                        "n_images": len(s),
                        "captions": captions[k],
                        "rendering": s.rendering,
                        "in_training_set": in_training[k],
                        "mean_reference": None
                        if not references
                        else [
                            {
                                "dataset": r.dataset,
                                "images": [int(r.index[0]), int(r.index[-1]) + 1],
                            }
                            for r in references[k]
                        ],
                    }
                    for k, s in sets.items()
                },
                "circuits": [
                    {
                        k: c.to_dict()[k]
                        for k in (
                            "dataset",
                            "timesteps",
                            "metric",
                            "tau",
                            "claimed",
                            "claim",
                            "gap",
                            "heads",
                            "faithfulness",
                            "recovered_without_circuit",
                            "n_necessary",
                            "size_range",
                            "size_ci",
                            "resamples",
                            "overlap_with_other",
                            "complexity",
                        )
                    }
                    for c in circuits
                ],
            },
        )
    return DiscoveryResult(circuits=circuits, table=table, curves=curves, roles=roles, labels=specs)
