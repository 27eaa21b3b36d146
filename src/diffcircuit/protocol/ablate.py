"""``diffcircuit ablate``: a chosen set of ablations on one dataset, as a table.

Mean and noise ablation take their reference (mean, SD) from held-out images: the ``n`` images after
the evaluated ones (``mean_reference="insample"``: the evaluated images themselves)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch

from diffcircuit.errors import DiffcircuitError
from diffcircuit.instrument.session import probe_registry
from diffcircuit.interventions.ablation import LEVELS, METHODS, Target, targets, token_target
from diffcircuit.interventions.sampling import sampling_effect
from diffcircuit.interventions.sweep import ablation_sweep
from diffcircuit.models.latent import model_images
from diffcircuit.models.loading import load_conditioned, unconditional_input, use_captions
from diffcircuit.protocol.datasets import reference_split
from diffcircuit.protocol.store import claim_command, write_json, write_parquet

__all__ = ["AblateConfig", "run_ablations"]


@dataclass(frozen=True, kw_only=True)
class AblateConfig:
    model: str = "embedded"
    allow_pickle: bool = False
    prompt: str | None = None  # conditional models: as in `run` (default: the unconditional branch)
    prompt_embeds: str | None = None
    class_label: int | None = None
    data: str = "faces"
    n: int = 16
    timesteps: tuple[int, ...] = (500,)
    seed: int = 0
    batch_size: int = 50
    methods: tuple[str, ...] = ("zero",)
    mean_reference: str = "heldout"  # mean/noise ablation's reference: the n images after the evaluated ones, or "insample"
    names: tuple[str, ...] = ()  # head addresses, layer paths, block names, ResNet paths or token:J[*W][@LAYER[:HEAD]]
    levels: tuple[str, ...] = ()  # every target of these levels
    token_weight: float = 0.0  # level token: multiply each token's attention by this (0 removes it)
    sample: int = 0  # also sample this many images with each target zero-ablated (0: no sampling)
    sample_steps: int = 50
    window: tuple[int, int] | None = None  # ablate only at sampling steps with timestep in [lo, hi]
    guidance: float = 1.0  # sampling a conditional model: classifier-free guidance scale (1: none)


def _chosen(cfg: AblateConfig, registry, model, tokens: tuple[str, ...]) -> list[Target]:
    bad = [lv for lv in cfg.levels if lv not in LEVELS]
    if bad:
        raise DiffcircuitError(f"unknown level {bad[0]!r}; choose from {', '.join(LEVELS)}")
    if not cfg.token_weight >= 0 or cfg.token_weight == float("inf"):
        raise DiffcircuitError(f"--token-weight must be a finite number >= 0, not {cfg.token_weight}")
    chosen = [t for lv in cfg.levels for t in targets(registry, lv, model, tokens, cfg.token_weight)]
    every = {t.name: t for lv in LEVELS for t in targets(registry, lv, model, tokens)}
    for name in cfg.names:
        target = every.get(name) or token_target(registry, name, len(tokens))
        if target is None:
            raise DiffcircuitError(f"{name!r} is not a head address, attention layer, block, ResNet block or prompt "
                                   "token (token:J, token:J*W to reweight, @LAYER[:HEAD] to act there only) of this model; "
                                   "`diffcircuit info` lists them")
        chosen.append(target)
    if not chosen:
        raise DiffcircuitError("nothing to ablate: give --target NAME (repeatable) or --level head|layer|block|resnet|token"
                               " (token: a model with a prompt)")
    if any(t.level == "token" for t in chosen) and set(cfg.methods) != {"zero"}:
        raise DiffcircuitError("prompt tokens are removed or reweighted, not replaced: use --methods zero")
    return list({t.name: t for t in chosen}.values())


def run_ablations(cfg: AblateConfig, out_dir: str | Path, *, progress=None) -> pd.DataFrame:
    """Run the chosen ablations and write ``out_dir/tables/ablations.parquet`` (and ``sampling.parquet``)."""
    if cfg.sample < 0 or cfg.sample_steps < 1 or (cfg.window is not None and cfg.window[0] > cfg.window[1]):
        raise DiffcircuitError("need --sample >= 0, --sample-steps >= 1 and a window LO,HI with LO <= HI")
    bad = [m for m in cfg.methods if m not in METHODS]
    if bad or not cfg.methods:
        raise DiffcircuitError(f"methods must be among {', '.join(METHODS)}; got {list(cfg.methods)}")
    den = load_conditioned(cfg.model, allow_pickle=cfg.allow_pickle, prompt=cfg.prompt, prompt_embeds=cfg.prompt_embeds,
                           class_label=cfg.class_label)
    if not cfg.guidance >= 0 or cfg.guidance == float("inf"):
        raise DiffcircuitError(f"--guidance must be a finite number >= 0, not {cfg.guidance}")
    unconditional = None if cfg.guidance == 1.0 or cfg.sample == 0 else unconditional_input(den, allow_pickle=cfg.allow_pickle)
    den.check_timesteps(cfg.timesteps)
    if cfg.mean_reference not in ("heldout", "insample"):
        raise DiffcircuitError(f"--mean-reference must be heldout or insample (one dataset), not {cfg.mean_reference!r}")
    held_out = cfg.mean_reference == "heldout" and bool({"mean", "noise"} & set(cfg.methods))
    try:
        loaded = model_images(den, cfg.data, n=2 * cfg.n if held_out else cfg.n, seed=cfg.seed)
    except DiffcircuitError as err:
        if not held_out:
            raise
        raise DiffcircuitError(f"{err} (mean and noise ablation take their reference from the n images after the "
                               "evaluated ones, 2 x --n in all: lower --n or give --mean-reference insample)") from None
    images, references = reference_split({cfg.data: loaded}, cfg.n, "heldout" if held_out else "insample")
    images, reference = images[cfg.data], (references or {}).get(cfg.data)
    if use_captions(den, cfg.data, images.captions, allow_pickle=cfg.allow_pickle, spec=cfg.data) and "token" in (
            *cfg.levels, *(name.split(":")[0] for name in cfg.names)):
        raise DiffcircuitError(f"{cfg.data} has a caption per image: token J is a different word in each, so token "
                               "ablation needs one shared --prompt and a folder without captions")
    registry = probe_registry(den, torch.from_numpy(images.images[:1]), torch.zeros(1, dtype=torch.long))
    chosen = _chosen(cfg, registry, den.network, den.conditioning.tokens if den.conditioning else ())
    out = Path(out_dir)
    with claim_command(out, "ablate", asdict(cfg)):  # the inputs are valid: the directory is this command's
        table = ablation_sweep(den, images.images, targets=chosen, methods=cfg.methods, timesteps=cfg.timesteps,
                               seed=cfg.seed, dataset=cfg.data, batch_size=cfg.batch_size, registry=registry,
                               progress=progress, reference=reference)
        write_parquet(out / "tables" / "ablations.parquet", table)
        if cfg.sample > 0:
            effects = [sampling_effect(den, t, n=cfg.sample, steps=cfg.sample_steps, seed=cfg.seed, window=cfg.window,
                                       guidance=cfg.guidance, unconditional=unconditional) for t in chosen]
            write_parquet(out / "tables" / "sampling.parquet", pd.concat(effects, ignore_index=True))
        write_json(out / "ablate.json", {
            "config": asdict(cfg), "finished": True, "model_path": str(den.model_path),
            "conditioning": den.conditioning.description if den.conditioning else None,
            "targets": [t.name for t in chosen], "mean_reference": None if reference is None else [
                {"dataset": r.dataset, "images": [int(r.index[0]), int(r.index[-1]) + 1]} for r in reference]})
    return table
