"""``diffcircuit generate``: sample with and without an intervention from the same seeds, as a grid.

The target is any union of head addresses, attention layers and blocks (or one ResNet block, zero
ablation only). Rows of the grid: the clean samples, the intervened samples, and their absolute
difference (scaled to the largest); per-sample pixel MSE and SSIM go to a JSON file beside it.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch

from diffcircuit.errors import ConfigError, InputError
from diffcircuit.interventions.ablation import LEVELS, Target, targets
from diffcircuit.interventions.sampling import SAMPLING_METHODS, controlled_samples, sample_metrics
from diffcircuit.models.loading import unconditional_input
from diffcircuit.models.spec import MODEL_HELP, ModelSpec
from diffcircuit.protocol.setup import build_setup
from diffcircuit.protocol.store import atomic_write_bytes, check_writable, write_json

__all__ = ["GENERATE_HELP", "GenerateConfig", "GenerateResult", "run_generate"]


@dataclass(frozen=True, kw_only=True)
class GenerateConfig(ModelSpec):
    """``diffcircuit generate``: the model (``ModelSpec``'s fields), what to intervene on, and the sampling."""

    ablate: tuple[str, ...] = ()  # head addresses, layer paths, block names, or one ResNet block
    method: str = "zero"  # zero, mean (over the clean samples at the same step) or scale
    scale: float | None = None  # the factor for method "scale" (0 removes, 2 doubles)
    n: int = 8
    steps: int = 50
    seed: int = 0
    window: tuple[int, int] | None = None  # intervene only at steps whose timestep is in [lo, hi]
    guidance: float = 1.0  # classifier-free guidance scale (1: the conditional model alone)

    def __post_init__(self):
        super().__post_init__()
        if not self.ablate:
            raise ConfigError(
                "nothing to intervene on: give ablate (head addresses, layers or blocks)", "ablate"
            )
        if self.method not in SAMPLING_METHODS:
            raise ConfigError(
                f"method must be one of {', '.join(SAMPLING_METHODS)}, not {self.method!r}",
                "method",
            )
        if (self.method == "scale") != (self.scale is not None):
            raise ConfigError(
                "scale goes with method 'scale' (and only with it)", "scale", "method"
            )
        if self.n < 1 or self.steps < 1 or self.n > 64:
            raise ConfigError("need 1 <= n <= 64 and steps >= 1", "n", "steps")
        if self.window is not None and self.window[0] > self.window[1]:
            raise ConfigError("window LO,HI needs LO <= HI", "window")
        if not self.guidance >= 0 or self.guidance == float("inf"):
            raise ConfigError(
                f"guidance must be a finite number >= 0, not {self.guidance}", "guidance"
            )


# each GenerateConfig field in a line: the help of the flag that sets it (``diffcircuit generate``)
GENERATE_HELP = MODEL_HELP | {
    "ablate": "comma-separated head addresses, layers, blocks (or one ResNet block)",
    "method": "zero, mean (over the clean samples at each step) or scale",
    "scale": "with --method scale: multiply the heads' outputs by F",
    "n": "samples (columns of the grid)",
    "steps": "DDIM steps",
    "seed": "noise seed; same seed, same samples",
    "window": "intervene only at timesteps LO,HI",
    "guidance": "sampling a conditional model: classifier-free guidance scale (1: none)",
}


@dataclass
class GenerateResult:
    target: Target
    metrics: pd.DataFrame  # per sample: pixel_mse, ssim
    clean: torch.Tensor
    changed: torch.Tensor


def _target(names: tuple[str, ...], registry, model) -> Target:
    every = {t.name: t for level in LEVELS for t in targets(registry, level, model)}
    unknown = [n for n in names if n not in every]
    if unknown:
        raise ConfigError(
            f"{unknown[0]!r} is not a head address, attention layer, block or ResNet block of this "
            "model; `diffcircuit info` lists them",
            "ablate",
        )
    chosen = [every[n] for n in names]
    if any(t.level == "resnet" for t in chosen):
        if len(chosen) > 1:
            raise ConfigError("a ResNet block can only be intervened on alone", "ablate")
        return chosen[0]
    if len(chosen) == 1:
        return chosen[0]
    heads = tuple(dict.fromkeys(a for t in chosen for a in t.heads))
    return Target(level="set", name=",".join(names), heads=heads)


def _grid_figure(clean: torch.Tensor, changed: torch.Tensor, title: str):
    """Rows: the clean samples, the intervened ones and their |difference|, scaled so that the largest difference
    is white (its label says the scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    diff = (changed - clean).abs()
    top = float(diff.max())
    diff = diff / max(top, 1e-12) * 2 - 1  # largest difference shown white
    rows = {
        "clean": clean,
        "intervened": changed,
        f"|difference|\nblack 0, white {top:.3g}\n(pixels in [-1, 1])": diff,
    }
    n = clean.shape[0]
    fig, axes = plt.subplots(3, n, figsize=(1.2 * n + 1.2, 4.0), squeeze=False)
    for r, (label, batch) in enumerate(rows.items()):
        for i in range(n):
            img = ((batch[i].float().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()
            ax = axes[r][i]
            ax.imshow(
                img[..., 0] if img.shape[-1] == 1 else img,
                cmap="gray",
                vmin=0,
                vmax=1,
                interpolation="nearest",
            )
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_ylabel(label, fontsize=8)
    fig.suptitle(title, fontsize=8)
    return fig


def _grid_png(clean: torch.Tensor, changed: torch.Tensor, title: str) -> bytes:
    import matplotlib.pyplot as plt

    fig = _grid_figure(clean, changed, title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def run_generate(cfg: GenerateConfig, out: str | Path, *, progress=None) -> GenerateResult:
    """Sample clean and intervened images; write the grid PNG and ``<out>.json`` with per-sample metrics.
    ``progress(k)``: k more denoising steps done (2 x steps in all)."""
    out = Path(out)
    if out.suffix.lower() != ".png" or out.is_dir():
        raise InputError(f"out must name a .png file, not {str(out)!r}", "out")
    check_writable(out.parent)
    setup = build_setup(cfg)
    den, registry = setup.den, setup.registry
    unconditional = (
        None if cfg.guidance == 1.0 else unconditional_input(den, allow_pickle=cfg.allow_pickle)
    )
    target = _target(cfg.ablate, registry, den.network)
    if target.level == "resnet" and cfg.method != "zero":
        raise ConfigError("ResNet blocks can only be zero-ablated while sampling", "method")
    with setup.autocast():
        clean, changed = controlled_samples(
            den,
            target,
            n=cfg.n,
            steps=cfg.steps,
            seed=cfg.seed,
            window=cfg.window,
            method=cfg.method,
            scale=cfg.scale,
            guidance=cfg.guidance,
            unconditional=unconditional,
            progress=progress,
        )
    metrics = sample_metrics(clean, changed)
    what = f"{cfg.method}" + (f" x{cfg.scale:g}" if cfg.scale is not None else "")
    window = "every step" if cfg.window is None else f"t in [{cfg.window[0]}, {cfg.window[1]}]"
    given = den.conditioning.description if den.conditioning else ""
    given += f", guidance {cfg.guidance:g}" if cfg.guidance != 1.0 else ""
    title = (
        f"{target.name} ({len(target.heads) or 'ResNet'} heads): {what}, {window}; DDIM {cfg.steps} steps, seed {cfg.seed}; "
        + (f"{given}; " if given else "")
        + f"pixel MSE {metrics.pixel_mse.mean():.4g}, SSIM {metrics.ssim.mean():.3f}"
    )
    atomic_write_bytes(out, _grid_png(clean, changed, title))
    write_json(
        out.with_suffix(".json"),
        {
            "config": asdict(cfg),
            "target": target.name,
            "heads": [str(a) for a in target.heads],
            "samples": json.loads(metrics.to_json(orient="records")),
            "pixel_mse_mean": float(metrics.pixel_mse.mean()),
            "ssim_mean": float(metrics.ssim.mean()),
        },
    )
    return GenerateResult(target=target, metrics=metrics, clean=clean, changed=changed)
