"""``RunConfig``: everything that determines a run's results, validated up front."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from diffcircuit.errors import ConfigError, InputError
from diffcircuit.models.spec import MODEL_HELP, ModelSpec, config_from_mapping

__all__ = [
    "ANALYSES",
    "FIELD_HELP",
    "MEAN_REFERENCES",
    "NOT_RESULTS",
    "PRESETS",
    "RunConfig",
    "SYNTHETIC_COLORS",
    "default_config_yaml",
    "load_config_file",
    "not_results",
    "parse_timesteps",
]


def parse_timesteps(text: str) -> tuple[int, ...]:
    """``"100,500,900"`` -> ``(100, 500, 900)``; a clear error for anything else (an empty part included)."""
    if not str(text).strip():
        raise ConfigError("give at least one timestep, e.g. 100,500,900", "timesteps")
    try:
        return tuple(int(part) for part in str(text).split(","))
    except ValueError:
        raise ConfigError(
            f"timesteps must be comma-separated integers like 100,500,900, not {text!r}",
            "timesteps",
        ) from None


ANALYSES = ("ablation", "patching", "attribution", "discovery")
SYNTHETIC_COLORS = (
    "auto",
    "color",
    "gray",
)  # auto: gray when the other dataset is grayscale (R = G = B)
MEAN_REFERENCES = ("heldout", "pooled", "insample")


# settings that change how a result is computed, never what it is (``RunConfig.results_key``; the commands'
# directory claims): a run or command resumed with other values of these continues the same results
NOT_RESULTS = (
    "batch_size",
    "device",
    "capture",
    "backend",
    "ray_address",
    "workers",
    "threads",
    "shard_images",
)


def not_results(precision: str) -> tuple[str, ...]:
    """``NOT_RESULTS`` for a run in ``precision``: under bf16/fp16 the capture path changes results too (the
    fused kernel runs in that precision, the naive reference in fp32), so it is kept."""
    return NOT_RESULTS if precision == "fp32" else tuple(k for k in NOT_RESULTS if k != "capture")


@dataclass(frozen=True, kw_only=True)
class RunConfig(ModelSpec):
    """The main job's settings: the model and how it runs (the ``ModelSpec`` fields: model, allow_pickle, device,
    precision, prompt, prompt_embeds, class_label), then the data and the analyses. Defaults: the embedded model,
    synthetic vs LFW faces."""

    captions: bool = (
        True  # text-conditioned models: an image folder's captions.csv/.jsonl prompts its images
    )
    data_a: str = "synthetic"
    data_b: str = "faces"
    n: int = 100
    synthetic_color: str = (
        "auto"  # render the synthetic set in colour or gray ("auto": as the other set)
    )
    match_histogram: bool = (
        False  # match each synthetic image's luminance histogram to the other set's image
    )
    timesteps: tuple[int, ...] = (100, 500, 900)
    seed: int = 0
    batch_size: int = 50
    backend: str = "local"  # where shards are computed: this process, or Ray workers
    ray_address: str | None = (
        None  # join this Ray cluster (None: start a local instance sized to this machine)
    )
    workers: int = 0  # Ray workers (0: one per CPU, or per GPU on cuda)
    threads: int = (
        0  # intra-op threads per process (0: one per core; Ray CPU workers then share the cores)
    )
    shard_images: int = (
        256  # images per observation shard (the unit of resume, parallelism and memory)
    )
    skip_bad: bool = False
    capture: str = (
        "fused"  # "fused" (one fused kernel call) or "naive" (explicit softmax, the reference)
    )
    ablate_n: int = 16  # images per dataset for the ablation sweep (0: no ablations)
    ablation_methods: tuple[str, ...] = ("zero", "mean")
    mean_reference: str = "heldout"  # mean/noise ablation's reference images: held out, pooled over both, or in-sample
    seed_repeats: int = 2  # extra noise seeds (seed+1..) for the seed-variance check (0: none)
    role_null_block: int = (
        100  # the role null scores each head against the other images of its block of this many
    )
    role_permutations: int = 4999  # permutations of the images per role test (p floor 1/(R + 1))
    null_sets: int = (
        100  # random head sets per layer/block size: the null distribution a component must beat
    )
    correction: str = (
        "fdr_bh"  # multiple-comparison correction within each test family: fdr_bh or holm
    )
    circuit_resamples: int = (
        10  # bootstrap resamples of images: circuit stability and the CIs of sizes and overlap
    )
    circuit_taus: tuple[float, ...] = (
        0.02,
        0.05,
        0.1,
    )  # fractions of the gap L_empty − L_full a circuit may lose (0.05 is primary)
    circuit_metric: str = (
        "eps"  # circuit loss: "eps" (ε-MSE) or "output" (distance to the full model's ε̂, as ACDC)
    )
    analyses: tuple[str, ...] = (
        ANALYSES  # which intervention analyses run (on the first ablate_n images)
    )

    def __post_init__(self):
        super().__post_init__()  # the model's fields
        if self.backend not in ("local", "ray"):
            raise ConfigError(f"backend must be 'local' or 'ray', not {self.backend!r}", "backend")
        if self.workers < 0 or self.threads < 0 or self.shard_images < 1:
            raise ConfigError(
                "workers and threads must be >= 0 and shard_images >= 1",
                "workers",
                "threads",
                "shard_images",
            )
        if self.n < 1:
            raise ConfigError(f"n must be at least 1, not {self.n}", "n")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, not {self.batch_size}", "batch_size")
        if len(set(self.timesteps)) != len(self.timesteps):
            raise ConfigError(f"timesteps repeat: {list(self.timesteps)}", "timesteps")
        if self.capture not in ("fused", "naive"):
            raise ConfigError(
                f"capture must be 'fused' or 'naive', not {self.capture!r}", "capture"
            )
        if self.seed_repeats < 0:
            raise ConfigError(f"seed_repeats must be >= 0, not {self.seed_repeats}", "seed_repeats")
        if self.correction not in ("fdr_bh", "holm"):
            raise ConfigError(
                f"correction must be 'fdr_bh' or 'holm', not {self.correction!r}", "correction"
            )
        if self.circuit_resamples < 0:
            raise ConfigError(
                f"circuit_resamples must be >= 0, not {self.circuit_resamples}", "circuit_resamples"
            )
        if self.role_null_block < 2:
            raise ConfigError(
                f"role_null_block must be at least 2, not {self.role_null_block}", "role_null_block"
            )
        if self.role_permutations < 19:
            raise ConfigError(
                f"role_permutations must be at least 19, not {self.role_permutations}",
                "role_permutations",
            )
        if self.null_sets < 1:
            raise ConfigError(f"null_sets must be at least 1, not {self.null_sets}", "null_sets")
        if self.ablate_n < 0:
            raise ConfigError(f"ablate_n must be >= 0, not {self.ablate_n}", "ablate_n")
        bad = [m for m in self.ablation_methods if m not in ("zero", "mean", "resample", "noise")]
        if bad or not self.ablation_methods:
            raise ConfigError(
                f"ablation_methods must be among zero, mean, resample, noise; got {list(self.ablation_methods)}",
                "ablation_methods",
            )
        if self.seed < 0:
            raise ConfigError(f"seed must be >= 0, not {self.seed}", "seed")
        if not self.timesteps:
            raise ConfigError(
                "give at least one timestep in timesteps, e.g. 100,500,900", "timesteps"
            )
        unknown = [a for a in self.analyses if a not in ANALYSES]
        if unknown:
            raise ConfigError(
                f"unknown analyses {unknown}; choose from {', '.join(ANALYSES)}", "analyses"
            )
        if "discovery" in self.analyses and not {"ablation"} <= set(self.analyses):
            raise ConfigError(
                "discovery ranks heads by the ablation sweep: include 'ablation' in analyses",
                "analyses",
            )
        self._check_data_options()
        if (
            not self.circuit_taus
            or 0.05 not in self.circuit_taus
            or any(not 0 < t < 1 for t in self.circuit_taus)
        ):
            raise ConfigError(
                f"circuit_taus must be fractions of the gap L_empty − L_full in (0, 1) including 0.05, "
                f"not {list(self.circuit_taus)}",
                "circuit_taus",
            )
        if self.circuit_metric not in ("eps", "output"):
            raise ConfigError(
                f"circuit_metric must be 'eps' or 'output', not {self.circuit_metric!r}",
                "circuit_metric",
            )

    def _check_data_options(self) -> None:
        if self.synthetic_color not in SYNTHETIC_COLORS:
            raise ConfigError(
                f"synthetic_color must be one of {', '.join(SYNTHETIC_COLORS)}, not {self.synthetic_color!r}",
                "synthetic_color",
            )
        if self.match_histogram and [self.data_a, self.data_b].count("synthetic") != 1:
            raise ConfigError(
                "match_histogram matches the synthetic set to the other dataset: exactly one of "
                f"data_a, data_b must be 'synthetic', not {self.data_a!r} and {self.data_b!r}",
                "match_histogram",
                "data_a",
                "data_b",
            )
        if self.mean_reference not in MEAN_REFERENCES:
            raise ConfigError(
                f"mean_reference must be one of {', '.join(MEAN_REFERENCES)}, not {self.mean_reference!r}",
                "mean_reference",
            )
        if (
            self.mean_reference != "insample"
            and self.uses_mean_reference
            and self.n <= self.ablate_n
        ):
            raise ConfigError(
                f"mean_reference {self.mean_reference!r} takes the mean from images outside the ablate_n "
                f"evaluated ones, but n = {self.n} <= ablate_n = {self.ablate_n}: raise n, lower "
                "ablate_n, or set mean_reference insample",
                "mean_reference",
                "ablate_n",
                "n",
            )

    @property
    def uses_mean_reference(self) -> bool:
        """Whether an analysis replaces activations by a reference mean (mean/noise ablation, mean attribution,
        circuit discovery)."""
        means = {"mean", "noise"} & set(self.ablation_methods)
        return bool(
            (means and self.runs("ablation"))
            or ("mean" in self.ablation_methods and self.runs("attribution"))
            or self.runs("discovery")
        )

    def runs(self, analysis: str) -> bool:
        """Whether an intervention analysis runs (it needs ablate_n > 0; discovery also mean ablation)."""
        if self.ablate_n == 0 or analysis not in self.analyses:
            return False
        return analysis != "discovery" or "mean" in self.ablation_methods

    def to_dict(self) -> dict:
        d = asdict(self)
        d["timesteps"] = list(self.timesteps)
        d["ablation_methods"] = list(self.ablation_methods)
        d["circuit_taus"] = list(self.circuit_taus)
        d["analyses"] = list(self.analyses)
        return d

    @classmethod
    def from_mapping(cls, values, *, source: str | None = "config") -> RunConfig:
        """A validated config from plain values (YAML, CLI); unknown or ill-typed keys are named. ``analyses``
        ``none`` is no intervention analysis (observation only)."""
        if values.get("analyses") in ("none", ["none"], ("none",)):
            values = {**values, "analyses": ()}
        return config_from_mapping(cls, values, source=source)

    def results_key(self) -> dict:
        """The settings that change results (not batch size, device, capture path in fp32, backend, workers
        or sharding, which must not; CPU results are bit-identical for the same thread count)."""
        d = self.to_dict()
        for k in not_results(self.precision):
            d.pop(k)
        return d


def load_config_file(path: str | Path) -> dict:
    """The mapping in a YAML config file; a clear error if it is missing or not a mapping."""
    import yaml

    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise InputError(f"cannot read config {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise InputError(f"config {path} is not valid YAML{where}: {problem}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise InputError(f"config {path} must be a mapping of keys to values")
    return values


FIELD_HELP = _COMMENTS = MODEL_HELP | {
    # each RunConfig field in a line: the config file's comments and the run command's help
    "captions": "text-conditioned models: each image of a folder with captions.csv/.jsonl gets its own caption",
    "data_a": "'synthetic', 'faces', 'nonfaces' or an image folder (the paper: synthetic shapes)",
    "data_b": "the second distribution (the paper: 2,000 CelebA faces; here LFW's 100 faces)",
    "n": "images per dataset (the paper: 2,000; 'faces' has 100)",
    "synthetic_color": "auto (grayscale when the other dataset is, as LFW's faces are), color or gray",
    "match_histogram": "match each synthetic image's luminance histogram to the other dataset's image of its index",
    "timesteps": "timesteps analysed",
    "seed": "noise seed; same seed, same results",
    "batch_size": "images per forward pass (does not change results)",
    "backend": "local (this process) or ray (shards as Ray tasks; pip install 'diffcircuit[ray]')",
    "ray_address": "an existing Ray cluster to join (none: start a local instance)",
    "workers": "Ray workers, each holding the model once (0: one per CPU, or per GPU on cuda)",
    "threads": "intra-op threads per process (0: one per core; Ray CPU workers share the cores)",
    "shard_images": "images per observation shard: the unit of resume, parallelism and memory",
    "skip_bad": "skip unreadable image files with a warning instead of stopping",
    "capture": "fused (one fused attention call) or naive (explicit softmax, the reference)",
    "ablate_n": "images per dataset for ablations, patching and attribution (0: none)",
    "ablation_methods": "zero, mean, resample, noise",
    "mean_reference": "mean/noise ablation's reference: heldout (the next ablate_n images), pooled (both sets' held-out), insample",
    "seed_repeats": "extra noise seeds for the seed-variance check",
    "role_null_block": "role null: each head's attention is scored against the features of the other images of its block",
    "role_permutations": "role null: permutations of the images per test (p floor 1/(R+1))",
    "null_sets": "random head sets per layer/block size: the distribution a critical component must beat (p floor 1/(N+1))",
    "circuit_resamples": "bootstrap resamples of images for circuit stability",
    "circuit_taus": "fractions of the gap L_empty - L_full (all heads ablated vs none) a circuit may lose; 0.05 is the primary",
    "circuit_metric": "circuit loss: eps (ε-MSE against the true noise) or output (distance to the full model's ε̂, as ACDC)",
    "analyses": "intervention analyses: ablation, patching, attribution, discovery (discovery needs ablation), or none",
    "correction": "multiple-comparison correction within each test family: fdr_bh (Benjamini-Hochberg) or holm",
}


# The paper's protocol (arXiv 2506.17237): its model, 2,000 images per distribution, 10 timesteps; for a GPU.
PRESETS: dict[str, dict[str, Any]] = {
    "demo": {},
    "paper": dict(
        model="google/ddpm-celebahq-256",
        data_b="data/celeba",
        n=2000,
        timesteps=tuple(range(50, 1000, 100)),
        batch_size=64,
        ablate_n=200,
        circuit_resamples=20,
    ),
}


def default_config_yaml(preset: str = "demo") -> str:
    """A commented config with every key at its default, or at a preset's values (``diffcircuit init-config``)."""
    import yaml

    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}", "preset")
    lines = [
        "# diffcircuit run configuration. Command-line flags override these keys.",
        f"# preset: {preset}"
        + (
            "  (the paper's scale: point data_b at your CelebA folder; meant for a GPU)"
            if preset == "paper"
            else "  (the embedded default that `make demo` runs)"
        ),
        "",
    ]
    for key, value in RunConfig(**PRESETS[preset]).to_dict().items():
        lines.append(f"# {_COMMENTS.get(key, '')}")
        lines.append(
            yaml.safe_dump({key: value}, default_flow_style=True, sort_keys=False)
            .strip()
            .strip("{}")
        )
    return "\n".join(lines) + "\n"
