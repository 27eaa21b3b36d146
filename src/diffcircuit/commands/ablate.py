"""``diffcircuit ablate``: a chosen set of ablations on one dataset, as a table.

Mean and noise ablation take their reference (mean, SD) from held-out images: the ``n`` images after
the evaluated ones (``mean_reference="insample"``: the evaluated images themselves)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from diffcircuit.errors import ConfigError, DiffcircuitError
from diffcircuit.interventions.ablation import LEVELS, METHODS, Target, targets, token_target
from diffcircuit.interventions.sampling import sampling_effect
from diffcircuit.interventions.sweep import ablation_sweep
from diffcircuit.models.loading import unconditional_input
from diffcircuit.models.spec import MODEL_HELP, ModelSpec
from diffcircuit.protocol.config import not_results
from diffcircuit.protocol.datasets import reference_split
from diffcircuit.protocol.setup import build_setup, one_set
from diffcircuit.protocol.store import check_writable, claim_command, write_json, write_parquet

__all__ = ["ABLATE_HELP", "AblateConfig", "run_ablations"]


@dataclass(frozen=True, kw_only=True)
class AblateConfig(ModelSpec):
    """``diffcircuit ablate``: the model (``ModelSpec``'s fields), one dataset, the targets and methods."""

    data: str = "faces"
    n: int = 16
    timesteps: tuple[int, ...] = (500,)
    seed: int = 0
    batch_size: int = 50
    methods: tuple[str, ...] = ("zero",)
    mean_reference: str = "heldout"  # mean/noise ablation's reference: the n images after the evaluated ones, or "insample"
    names: tuple[
        str, ...
    ] = ()  # head addresses, layer paths, block names, ResNet paths or token:J[*W][@LAYER[:HEAD]]
    levels: tuple[str, ...] = ()  # every target of these levels
    token_weight: float = 0.0  # level token: multiply each token's attention by this (0 removes it)
    sample: int = 0  # also sample this many images with each target zero-ablated (0: no sampling)
    sample_steps: int = 50
    window: tuple[int, int] | None = None  # ablate only at sampling steps with timestep in [lo, hi]
    guidance: float = 1.0  # sampling a conditional model: classifier-free guidance scale (1: none)

    def __post_init__(self):
        super().__post_init__()
        if self.n < 1 or self.batch_size < 1 or not self.timesteps:
            raise ConfigError(
                "need n >= 1, batch_size >= 1 and at least one timestep in timesteps",
                "n",
                "batch_size",
                "timesteps",
            )
        if (
            self.sample < 0
            or self.sample_steps < 1
            or (self.window is not None and self.window[0] > self.window[1])
        ):
            raise ConfigError(
                "need sample >= 0, sample_steps >= 1 and a window LO,HI with LO <= HI",
                "sample",
                "sample_steps",
                "window",
            )
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise ConfigError(
                f"methods must be among {', '.join(METHODS)}; got {list(self.methods)}", "methods"
            )
        if not self.guidance >= 0 or self.guidance == float("inf"):
            raise ConfigError(
                f"guidance must be a finite number >= 0, not {self.guidance}", "guidance"
            )
        if self.mean_reference not in ("heldout", "insample"):
            raise ConfigError(
                f"mean_reference must be heldout or insample (one dataset), not {self.mean_reference!r}",
                "mean_reference",
            )
        bad = [lv for lv in self.levels if lv not in LEVELS]
        if bad:
            raise ConfigError(
                f"unknown level {bad[0]!r} in levels; choose from {', '.join(LEVELS)}", "levels"
            )
        if not self.token_weight >= 0 or self.token_weight == float("inf"):
            raise ConfigError(
                f"token_weight must be a finite number >= 0, not {self.token_weight}",
                "token_weight",
            )


# each AblateConfig field in a line: the help of the flag that sets it (``diffcircuit ablate``)
ABLATE_HELP = MODEL_HELP | {
    "data": "'synthetic', 'faces', 'nonfaces' or an image folder",
    "n": "images ablated (mean/noise ablation's reference: the n after them)",
    "timesteps": "comma-separated timesteps",
    "seed": "noise seed; same seed, same results",
    "batch_size": "images per forward pass (does not change results)",
    "methods": "comma-separated: zero, mean, resample, noise",
    "mean_reference": "mean/noise ablation's reference: heldout (the n images after the evaluated ones) or "
    "insample",
    "names": "head address, layer, block, ResNet block, or prompt token token:J (token:J*W reweights it; "
    "@LAYER[:HEAD] only there) (repeatable)",
    "levels": "ablate every target of: head, layer, block, resnet, token (repeatable)",
    "token_weight": "with --level token: multiply each token's attention by W and renormalise (0 removes it)",
    "sample": "also sample N images (DDIM) with each target zero-ablated",
    "sample_steps": "DDIM steps of that sampling",
    "window": "ablate only at sampling timesteps LO,HI",
    "guidance": "sampling a conditional model: classifier-free guidance scale (1: none)",
}


def _chosen(cfg: AblateConfig, registry, model, tokens: tuple[str, ...]) -> list[Target]:
    chosen = [
        t for lv in cfg.levels for t in targets(registry, lv, model, tokens, cfg.token_weight)
    ]
    every = {t.name: t for lv in LEVELS for t in targets(registry, lv, model, tokens)}
    for name in cfg.names:
        target = every.get(name) or token_target(registry, name, len(tokens))
        if target is None:
            raise ConfigError(
                f"{name!r} is not a head address, attention layer, block, ResNet block or prompt "
                "token (token:J, token:J*W to reweight, @LAYER[:HEAD] to act there only) of this model; "
                "`diffcircuit info` lists them",
                "names",
            )
        chosen.append(target)
    if not chosen:
        raise ConfigError(
            "nothing to ablate: give names (head addresses, layers, blocks, ResNet blocks, tokens) or levels "
            "(head, layer, block, resnet, token: a model with a prompt)",
            "names",
            "levels",
        )
    if any(t.level == "token" for t in chosen) and set(cfg.methods) != {"zero"}:
        raise ConfigError(
            "prompt tokens are removed or reweighted, not replaced: use methods zero", "methods"
        )
    return list({t.name: t for t in chosen}.values())


def run_ablations(
    cfg: AblateConfig, out_dir: str | Path, *, progress=None, sampling_progress=None
) -> pd.DataFrame:
    """Run the chosen ablations and write ``out_dir/tables/ablations.parquet`` (and ``sampling.parquet``).
    ``progress(k)``: k more images ablated; ``sampling_progress(k, total)``: k more sampling steps of ``total``
    (with ``sample``: every target's clean and intervened sampling)."""
    check_writable(Path(out_dir))
    held_out = cfg.mean_reference == "heldout" and bool({"mean", "noise"} & set(cfg.methods))

    def image_sets(den):  # with a held-out reference, the n images after the evaluated ones too
        try:
            return one_set(cfg.data, cfg.data, n=2 * cfg.n if held_out else cfg.n, seed=cfg.seed)(
                den
            )
        except DiffcircuitError as err:
            if not held_out:
                raise
            raise ConfigError(
                f"{err} (mean and noise ablation take their reference from the n images after the "
                "evaluated ones, 2 x n in all: lower n or set mean_reference insample)",
                "n",
                "mean_reference",
            ) from None

    setup = build_setup(cfg, timesteps=cfg.timesteps, images=image_sets)
    den, registry = setup.den, setup.registry
    unconditional = (
        None
        if cfg.guidance == 1.0 or cfg.sample == 0
        else unconditional_input(den, allow_pickle=cfg.allow_pickle)
    )
    images, references = reference_split(setup.sets, cfg.n, "heldout" if held_out else "insample")
    images, reference = images[cfg.data], (references or {}).get(cfg.data)
    if images.captions and "token" in (*cfg.levels, *(name.split(":")[0] for name in cfg.names)):
        raise ConfigError(
            f"{cfg.data} has a caption per image: token J is a different word in each, so token "
            "ablation needs one shared prompt and a folder without captions"
        )
    chosen = _chosen(
        cfg, registry, den.network, den.conditioning.tokens if den.conditioning else ()
    )
    out = Path(out_dir)
    table_path = out / "tables" / "ablations.parquet"
    # the inputs are valid: the directory is this command's
    with claim_command(out, "ablate", asdict(cfg), ignore=not_results(cfg.precision)) as finished:
        if (
            finished and table_path.exists()
        ):  # the same config finished here: its results, read back
            return pd.read_parquet(table_path)
        with setup.autocast():
            table = ablation_sweep(
                den,
                images.images,
                targets=chosen,
                methods=cfg.methods,
                timesteps=cfg.timesteps,
                seed=cfg.seed,
                dataset=cfg.data,
                batch_size=cfg.batch_size,
                registry=registry,
                progress=progress,
                reference=reference,
            )
        write_parquet(table_path, table)
        if cfg.sample > 0:
            with setup.autocast():
                effects = [
                    sampling_effect(
                        den,
                        t,
                        n=cfg.sample,
                        steps=cfg.sample_steps,
                        seed=cfg.seed,
                        window=cfg.window,
                        guidance=cfg.guidance,
                        unconditional=unconditional,
                        progress=None
                        if sampling_progress is None
                        else (lambda k: sampling_progress(k, 2 * cfg.sample_steps * len(chosen))),
                    )
                    for t in chosen
                ]
            write_parquet(
                out / "tables" / "sampling.parquet", pd.concat(effects, ignore_index=True)
            )
        write_json(
            out / "ablate.json",
            {
                "config": asdict(cfg),
                "finished": True,
                "model_path": str(den.model_path),
                "conditioning": den.conditioning.description if den.conditioning else None,
                "targets": [t.name for t in chosen],
                "mean_reference": None
                if reference is None
                else [
                    {"dataset": r.dataset, "images": [int(r.index[0]), int(r.index[-1]) + 1]}
                    for r in reference
                ],
            },
        )
    return table
