"""The embedded default model: a small DDPM UNet2DModel trained here, on this CPU.

Architecture: 32x32 RGB, channels (32, 64, 96), one ResNet per down block, attention at 16x16
and 8x8 (down, mid and up blocks), head_dim 8: 7 attention layers, 72 heads, ~1.9M parameters.

Training data: the synthetic distribution (a pool drawn with a training seed the analyses never
use, so seed-0 synthetic images are held out) and LFW faces 0-79 (80-99 held out), a share
``faces_share`` of each batch from the faces, with random flips and +-2 px shifts.

Objective: the v-prediction loss (Salimans & Ho 2022), ‖ε̂ − ε‖²/ᾱ_t = ‖v̂ − v‖², for a network
that outputs v (``prediction="v_prediction"``, the default) or ε. Plain ε-MSE gives large t almost
no gradient (errors there are ~1e-4), and an ε-output network must reproduce its input to ~0.5 %
rms to beat the trivial predictor √(1−ᾱ)·x_t at t = 900, which a small net does not manage; a
v-output network predicts x₀ there directly (ε̂ = √(1−ᾱ)·x_t + √ᾱ·v̂ is exact in x_t).

At large t the best a network can do for an image is the posterior mean of x₀ over the *training
mixture*: when it cannot tell a synthetic image from a face (at t = 900, √ᾱ ≈ 0.016), it predicts
a blend that includes the mean face, which is worse than predicting 0 on synthetic images. The
share of faces sets that blend; ``faces_share`` = 0.2 keeps it small.
An exponential moving average of the weights is what gets saved.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from diffcircuit.data.faces import lfw_images
from diffcircuit.data.synthetic import synthetic_images
from diffcircuit.models.diffusion import (
    add_noise,
    eps_from_output,
    eps_mse_per_image,
    implied_x0,
    trivial_eps,
    x0_mse_per_image,
)
from diffcircuit.models.loading import load_denoiser, save_denoiser

__all__ = [
    "TINY_UNET_CONFIG",
    "TrainConfig",
    "build_tiny_unet",
    "held_out_quality",
    "train_tiny",
]

TINY_UNET_CONFIG = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    layers_per_block=1,
    block_out_channels=(32, 64, 96),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=8,
    norm_num_groups=8,
)
TRAIN_SYNTHETIC_SEED = 1_000_003  # the analyses use seed 0; this pool never overlaps them
FACES_TRAIN = 80  # faces 0..79 train, 80..99 are held out
QUALITY_TIMESTEPS = (100, 500, 900)


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """How ``train-tiny`` trains; every field is recorded in the model card."""

    steps: int = 4500
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 200
    ema_decay: float = 0.999
    synthetic_pool: int = 10_000
    seed: int = 0
    log_every: int = 50
    quality_images: int = 100  # held-out images per dataset for the model card (faces: at most 20)
    init_from: str | None = None  # start from this diffusers folder's weights (fine-tuning) instead of scratch
    t_min: int = 0  # timesteps are drawn uniformly from t_min..999 (a fine-tune can focus on large t)
    loss: str = "v"  # "v": ε-MSE weighted by 1/ᾱ_t (the v-prediction loss); "eps": plain ε-MSE
    faces_share: float = 0.2  # fraction of each batch drawn from the faces (the rest: synthetic)
    prediction: str = "v_prediction"  # what the network outputs: "v_prediction" or "epsilon" (diffusers' prediction_type)
    snapshot_every: int = 0  # write the EMA weights to out_dir/snapshot every N steps (0: never)


def build_tiny_unet(seed: int = 0):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(**TINY_UNET_CONFIG)


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and +-2 px shift (reflect-padded), per image."""
    flip = torch.rand(x.shape[0], generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    pad = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="reflect")
    dy, dx = torch.randint(0, 5, (2,), generator=gen).tolist()
    return pad[:, :, dy : dy + x.shape[2], dx : dx + x.shape[3]]


def _lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to zero at the last step."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * progress))


def _training_data(cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    synth, _, _ = synthetic_images(cfg.synthetic_pool, seed=TRAIN_SYNTHETIC_SEED)
    faces = lfw_images("faces")[:FACES_TRAIN]
    return torch.from_numpy(synth), torch.from_numpy(faces)


def _train_step(unet, opt, scheduler, batch, gen, t_min: int = 0, loss_kind: str = "v") -> float:
    acp = scheduler.alphas_cumprod
    t = torch.randint(t_min, scheduler.config.num_train_timesteps, (batch.shape[0],), generator=gen)
    eps = torch.randn(batch.shape, generator=gen)
    x_t = add_noise(batch, eps, t, acp)
    eps_hat = eps_from_output(unet(x_t, t).sample, x_t, t, acp, scheduler.config.prediction_type)
    weight = (1.0 / acp[t]).float() if loss_kind == "v" else torch.ones(len(t))  # 1/ᾱ_t: v-prediction loss
    loss = (weight * (eps_hat - eps).pow(2).flatten(1).mean(1)).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
    opt.step()
    return loss.item()


def train_tiny(
    out_dir: str | Path,
    cfg: TrainConfig = TrainConfig(),
    *,
    progress: Callable[[int, float], None] | None = None,
) -> Path:
    """Train the embedded model from scratch and write it, with its model card, to ``out_dir``."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type=cfg.prediction)
    unet = build_tiny_unet(cfg.seed)
    if cfg.init_from is not None:
        unet.load_state_dict(load_denoiser(cfg.init_from).network.state_dict())
    unet.train().requires_grad_(True)
    ema = EMAModel(unet.parameters(), decay=cfg.ema_decay, use_ema_warmup=True)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, cfg))
    synth, faces = _training_data(cfg)
    n_synth = cfg.batch_size - round(cfg.batch_size * cfg.faces_share)
    start = time.perf_counter()
    with open(out_dir / "train_log.csv", "w", newline="") as log_file:
        log = csv.writer(log_file)
        log.writerow(["step", "loss", "lr", "seconds"])
        for step in range(cfg.steps):
            s_idx = torch.randint(0, len(synth), (n_synth,), generator=gen)
            f_idx = torch.randint(0, len(faces), (cfg.batch_size - n_synth,), generator=gen)
            batch = _augment(torch.cat([synth[s_idx], faces[f_idx]]), gen)
            loss = _train_step(unet, opt, scheduler, batch, gen, cfg.t_min, cfg.loss)
            sched.step()
            ema.step(unet.parameters())
            if step % cfg.log_every == 0 or step == cfg.steps - 1:
                log.writerow([step, f"{loss:.6g}", f"{sched.get_last_lr()[0]:.3g}", f"{time.perf_counter() - start:.1f}"])
                log_file.flush()
            if cfg.snapshot_every and (step + 1) % cfg.snapshot_every == 0:
                _snapshot(out_dir / "snapshot", unet, ema, scheduler)
            if progress is not None:
                progress(step + 1, loss)
    seconds = time.perf_counter() - start
    ema.copy_to(unet.parameters())
    unet.eval().requires_grad_(False)
    save_denoiser(out_dir, unet, scheduler)
    quality = held_out_quality(unet, scheduler, n=cfg.quality_images)
    _write_model_card(out_dir, cfg, seconds, quality)
    return out_dir


def _snapshot(folder: Path, unet, ema, scheduler) -> None:
    """Save the current EMA weights without disturbing training."""
    ema.store(unet.parameters())
    ema.copy_to(unet.parameters())
    save_denoiser(folder, unet, scheduler)
    ema.restore(unet.parameters())


@torch.no_grad()
def held_out_quality(unet, scheduler, *, n: int = 100, timesteps=QUALITY_TIMESTEPS, seed: int = 12345) -> list[dict]:
    """ε-MSE and x₀-MSE of the model and of the trivial predictor on held-out images.

    Held out: synthetic images 0..n-1 of seed 0 (the training pool uses another seed) and LFW
    faces 80..99 (at most n of them). One fixed noise draw per image and timestep.
    """
    sets = {
        "synthetic": torch.from_numpy(synthetic_images(n, seed=0)[0]),
        "faces": torch.from_numpy(lfw_images("faces")[FACES_TRAIN:][:n]),
    }
    acp = scheduler.alphas_cumprod
    rows = []
    for name, x0 in sets.items():
        for t_val in timesteps:
            gen = torch.Generator().manual_seed(seed + t_val)
            eps = torch.randn(x0.shape, generator=gen)
            t = torch.full((x0.shape[0],), t_val, dtype=torch.long)
            x_t = add_noise(x0, eps, t, acp)
            pred = eps_from_output(unet(x_t, t).sample, x_t, t, acp, scheduler.config.prediction_type)
            base = trivial_eps(x_t, t, acp)
            rows.append(
                dict(
                    dataset=name,
                    timestep=t_val,
                    n_images=int(x0.shape[0]),
                    eps_mse=float(eps_mse_per_image(pred, eps).mean()),
                    eps_mse_trivial=float(eps_mse_per_image(base, eps).mean()),
                    x0_mse=float(x0_mse_per_image(implied_x0(x_t, pred, t, acp), x0).mean()),
                    x0_mse_trivial=float(x0_mse_per_image(implied_x0(x_t, base, t, acp), x0).mean()),
                )
            )
    return rows


def _write_model_card(out_dir: Path, cfg: TrainConfig, seconds: float, quality: list[dict]) -> None:
    n_params = sum(p.numel() for p in build_tiny_unet().parameters())
    (out_dir / "quality.json").write_text(json.dumps(quality, indent=2) + "\n")
    lines = [
        "# tiny-ddpm-32: diffcircuit's embedded default model",
        "",
        f"A DDPM `UNet2DModel` ({n_params:,} parameters; 32x32 RGB; attention at 16x16 and 8x8,",
        f"7 attention layers, 72 heads of dim 8), {cfg.prediction} (diffusers' prediction_type), 1,000 linear-β steps.",
        "Trained by diffcircuit on its synthetic shapes and 80 LFW faces; see `diffcircuit.models.tiny`.",
        "",
        "## Training",
        "",
        "```",
        "diffcircuit train-tiny --out DIR " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in asdict(cfg).items()
                                                       if k in ("steps", "batch_size", "lr", "seed", "init_from", "t_min", "loss", "prediction",
                                                                "faces_share")
                                                       and v is not None),
        "```",
        "",
        f"{cfg.steps} steps of batch {cfg.batch_size} ({cfg.faces_share:.0%} faces) in {seconds / 60:.1f} min on a 2-core CPU;",
        "loss: " + ("‖ε̂ − ε‖²/ᾱ_t = ‖v̂ − v‖² (the v-prediction loss)" if cfg.loss == "v" else "plain ε-MSE")
        + ", AdamW, cosine LR, EMA of weights",
        f"(decay {cfg.ema_decay}). Full settings: `" + json.dumps(asdict(cfg)) + "`.",
        "",
        "## Held-out quality",
        "",
        "Synthetic: seed-0 images 0-99 (never trained on). Faces: LFW faces 80-99 (held out).",
        "Trivial predictor: ε̂ = √(1−ᾱ_t)·x_t. ε̂ and x̂₀ of the model are those its output implies.",
        "",
        "| dataset | t | ε-MSE | ε-MSE trivial | x₀-MSE | x₀-MSE trivial |",
        "|---|---|---|---|---|---|",
    ]
    for r in quality:
        lines.append(
            f"| {r['dataset']} | {r['timestep']} | {r['eps_mse']:.3g} | {r['eps_mse_trivial']:.3g} "
            f"| {r['x0_mse']:.3g} | {r['x0_mse_trivial']:.3g} |"
        )
    (out_dir / "README.md").write_text("\n".join(lines) + "\n")

