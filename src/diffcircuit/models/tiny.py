"""The embedded default model: a small DDPM UNet2DModel trained here, on this CPU.

Architecture: 32x32 RGB, channels (32, 64, 96), one ResNet per down block, attention at 16x16
and 8x8 (down, mid and up blocks), head_dim 8: 7 attention layers, 72 heads, ~1.9M parameters.

Training data (``TrainConfig.composition``), with random flips and +-2 px shifts:

- ``"disjoint"`` (the default): disjoint from every image a run analyses. Synthetic shapes from the
  training namespace (generators ``(seed, i, TRAIN_NAMESPACE)``, which no analysed image's generator
  ``(seed, i)`` can equal: ``data.synthetic``), a share ``gray_share`` rendered grayscale; and random
  crops of scikit-image's sample photographs (``data.photos``), the "natural" share ``natural_share``
  of each batch. No LFW image, face or non-face, is used: all 100 faces and the non-face control stay
  held out.
- ``"faces80"``: the recipe of the model shipped before (synthetic shapes of seed 1,000,003, in
  colour, and LFW faces 0-79 as the natural share), for reproducing it.

Every training writes ``training_data.json`` (``data.provenance``) into the model folder: the sources,
seeds and index ranges it used, plus those of the model it was fine-tuned from; a run's manifest
counts from it how many analysed images the model was trained on (``in_training_set``).

Objective: the v-prediction loss (Salimans & Ho 2022), ‖ε̂ − ε‖²/ᾱ_t = ‖v̂ − v‖², for a network
that outputs v (``prediction="v_prediction"``, the default) or ε. Plain ε-MSE gives large t almost
no gradient (errors there are ~1e-4), and an ε-output network must reproduce its input to ~0.5 %
rms to beat the trivial predictor √(1−ᾱ)·x_t at t = 900, which a small net does not manage; a
v-output network predicts x₀ there directly (ε̂ = √(1−ᾱ)·x_t + √ᾱ·v̂ is exact in x_t).

At large t the best a network can do for an image is the posterior mean of x₀ over the *training
mixture*: when it cannot tell a synthetic image from a natural one (at t = 900, √ᾱ ≈ 0.016), it
predicts a blend that includes the mean natural image, which is worse than predicting 0 on synthetic
images. The natural share sets that blend; ``natural_share`` = 0.2 keeps it small.
An exponential moving average of the weights is what gets saved.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from diffcircuit.data.faces import LFW_FACES, lfw_images
from diffcircuit.data.photos import (
    BASE_SIDE,
    MIN_FRACTION,
    PHOTO_NAMESPACE,
    TRAIN_PHOTOS,
    photo_crops,
)
from diffcircuit.data.provenance import RECORD_FORMAT, TRAINING_RECORD, read_training_record
from diffcircuit.data.synthetic import synthetic_images
from diffcircuit.errors import ConfigError
from diffcircuit.models.diffusion import (
    add_noise,
    eps_from_output,
    eps_mse_per_image,
    implied_x0,
    trivial_eps,
    x0_mse_per_image,
)
from diffcircuit.models.loading import load_denoiser, save_denoiser
from diffcircuit.models.spec import _device_type, resolve_device

__all__ = [
    "COMPOSITIONS",
    "TINY_UNET_CONFIG",
    "TRAIN_HELP",
    "TRAIN_NAMESPACE",
    "TrainConfig",
    "build_tiny_unet",
    "held_out_quality",
    "train_tiny",
    "training_pool",
    "training_sources",
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
TRAIN_SYNTHETIC_SEED = (
    1_000_003  # "faces80": generators (1000003, i), which a run with --seed 1000003 would analyse
)
TRAIN_NAMESPACE = (
    0x74726169  # "trai": the third seed word of the "disjoint" synthetic pool's generators
)
FACES_TRAIN = 80  # "faces80": faces 0..79 train, 80..99 are held out
COMPOSITIONS = ("disjoint", "faces80")
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
    init_from: str | None = (
        None  # start from this diffusers folder's weights (fine-tuning) instead of scratch
    )
    t_min: int = (
        0  # timesteps are drawn uniformly from t_min..999 (a fine-tune can focus on large t)
    )
    loss: str = "v"  # "v": ε-MSE weighted by 1/ᾱ_t (the v-prediction loss); "eps": plain ε-MSE
    natural_share: float = (
        0.2  # fraction of each batch from the natural pool (photo crops, or faces 0-79 in faces80)
    )
    prediction: str = "v_prediction"  # what the network outputs: "v_prediction" or "epsilon" (diffusers' prediction_type)
    snapshot_every: int = 0  # write the EMA weights to out_dir/snapshot every N steps (0: never)
    composition: str = "disjoint"  # "disjoint": no analysed image (shapes + photo crops); "faces80": the old recipe
    photo_pool: int = 10_000  # photo crops in the natural pool ("disjoint")
    gray_share: float = 0.5  # fraction of the synthetic pool and of colour photo crops rendered grayscale ("disjoint")
    device: str = (
        "cpu"  # where training runs: cpu (the recipe the card records), cuda, cuda:N or auto
    )
    precision: str = (
        "fp32"  # fp32, or bf16 autocast for the forward passes (the loss and updates stay fp32)
    )

    def __post_init__(self):
        if self.device != "auto" and _device_type(self.device) not in ("cpu", "cuda"):
            raise ConfigError(
                f"device must be cpu, cuda, cuda:N or auto, not {self.device!r}", "device"
            )
        if self.precision not in ("fp32", "bf16"):  # fp16 would need loss scaling
            raise ConfigError(
                f"precision must be fp32 or bf16 for training, not {self.precision!r}", "precision"
            )
        if self.composition not in COMPOSITIONS:
            raise ConfigError(
                f"composition must be one of {', '.join(COMPOSITIONS)}, not {self.composition!r}",
                "composition",
            )
        if self.loss not in ("v", "eps"):
            raise ConfigError(f"loss must be 'v' or 'eps', not {self.loss!r}", "loss")
        if self.prediction not in ("v_prediction", "epsilon"):
            raise ConfigError(
                f"prediction must be 'v_prediction' or 'epsilon', not {self.prediction!r}",
                "prediction",
            )
        if not (0 <= self.natural_share <= 1 and 0 <= self.gray_share <= 1):
            raise ConfigError(
                f"natural_share and gray_share must lie in [0, 1], not {self.natural_share} and "
                f"{self.gray_share}",
                "natural_share",
                "gray_share",
            )
        if self.synthetic_pool < 1 or self.photo_pool < 1:
            raise ConfigError(
                "synthetic_pool and photo_pool must be at least 1", "synthetic_pool", "photo_pool"
            )
        if self.steps < 1 or self.batch_size < 2 or self.lr <= 0 or not 0 <= self.t_min < 1000:
            raise ConfigError(
                "need steps >= 1, batch_size >= 2, lr > 0 and 0 <= t_min < 1000",
                "steps",
                "batch_size",
                "lr",
                "t_min",
            )
        if (
            self.warmup_steps < 0
            or self.snapshot_every < 0
            or self.quality_images < 0
            or not 0 <= self.ema_decay < 1
        ):
            raise ConfigError(
                "warmup_steps, snapshot_every and quality_images must be >= 0 and ema_decay in [0, 1)",
                "warmup_steps",
                "snapshot_every",
                "quality_images",
                "ema_decay",
            )


# each TrainConfig field in a line: the help of the flag that sets it (``diffcircuit train-tiny``)
TRAIN_HELP = {
    "steps": "training steps",
    "batch_size": "images per training batch",
    "lr": "peak learning rate (linear warm-up, then cosine decay to zero)",
    "warmup_steps": "steps of linear learning-rate warm-up",
    "ema_decay": "decay of the exponential moving average of the weights that is saved",
    "synthetic_pool": "synthetic training images",
    "seed": "seed of the initial weights, batches and noise",
    "log_every": "steps between training-log lines",
    "quality_images": "held-out images per dataset for the model card (faces: at most 20)",
    "init_from": "fine-tune from this diffusers folder's weights",
    "t_min": "draw training timesteps from t-min..999",
    "loss": "'v' (ε-MSE weighted by 1/ᾱ) or 'eps' (plain ε-MSE)",
    "natural_share": "fraction of each batch from the natural pool (photo crops; faces 0-79 with --composition "
    "faces80)",
    "prediction": "network output: 'v_prediction' or 'epsilon'",
    "snapshot_every": "write the EMA weights to out_dir/snapshot every N steps (0: never)",
    "composition": "'disjoint' (shapes and photo crops, no analysed image) or 'faces80' (the old recipe: LFW "
    "faces 0-79)",
    "photo_pool": "photo crops in the natural pool (disjoint)",
    "gray_share": "fraction of synthetic and colour photo images rendered gray (disjoint)",
    "device": "where training runs: cpu (the recipe the model card records), cuda, cuda:N or auto",
    "precision": "fp32, or bf16 autocast for the forward passes (the loss and updates stay fp32)",
}


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


def _gray_flags(cfg: TrainConfig) -> np.ndarray:
    """Which synthetic pool images are rendered grayscale: a seeded Bernoulli(gray_share) draw per image."""
    return (
        np.random.default_rng([cfg.seed, TRAIN_NAMESPACE, 1]).random(cfg.synthetic_pool)
        < cfg.gray_share
    )


def training_pool(cfg: TrainConfig) -> tuple[np.ndarray, np.ndarray]:
    """The two pools batches are drawn from, float32 ``[N, 3, 32, 32]``: synthetic shapes and natural images."""
    if cfg.composition == "faces80":
        synth, _, _ = synthetic_images(cfg.synthetic_pool, seed=TRAIN_SYNTHETIC_SEED)
        return synth, lfw_images("faces")[:FACES_TRAIN]
    synth = np.concatenate(
        [
            synthetic_images(1, seed=cfg.seed, start=i, gray=bool(g), namespace=TRAIN_NAMESPACE)[0]
            for i, g in enumerate(_gray_flags(cfg))
        ]
    )
    return synth, photo_crops(cfg.photo_pool, seed=cfg.seed, gray_share=cfg.gray_share)


def training_sources(cfg: TrainConfig) -> list[dict]:
    """What ``training_pool(cfg)`` holds, as ``training_data.json`` sources (``data.provenance``)."""
    if cfg.composition == "faces80":
        return [
            {
                "kind": "synthetic",
                "seed": TRAIN_SYNTHETIC_SEED,
                "namespace": 0,
                "indices": [0, cfg.synthetic_pool],
                "rendering": "color",
            },
            {"kind": "lfw", "which": "faces", "indices": [0, FACES_TRAIN]},
        ]
    return [
        {
            "kind": "synthetic",
            "seed": cfg.seed,
            "namespace": TRAIN_NAMESPACE,
            "indices": [0, cfg.synthetic_pool],
            "rendering": f"gray with probability {cfg.gray_share} (per-image draw), else color",
        },
        {
            "kind": "photo_crops",
            "library": "scikit-image",
            "photos": list(TRAIN_PHOTOS),
            "seed": cfg.seed,
            "namespace": PHOTO_NAMESPACE,
            "indices": [0, cfg.photo_pool],
            "base_side": BASE_SIDE,
            "min_fraction": MIN_FRACTION,
            "gray_share": cfg.gray_share,
        },
    ]


def _training_record(cfg: TrainConfig) -> dict:
    """This training's sources, and those of the weights it started from (unknown ones make it incomplete)."""
    record = {
        "format": RECORD_FORMAT,
        "complete": True,
        "image_size": TINY_UNET_CONFIG["sample_size"],
        "composition": cfg.composition,
        "sources": training_sources(cfg),
    }
    if cfg.init_from is not None:
        parent = read_training_record(Path(cfg.init_from), Path(cfg.init_from) / "unet")
        if parent is None:
            record["complete"] = False
            record["note"] = (
                f"fine-tuned from {cfg.init_from}, which has no {TRAINING_RECORD}: its training data are unknown"
            )
        else:
            record["complete"] = bool(parent.get("complete", False))
            record["sources"] += [
                s | {"inherited_from": str(cfg.init_from)} for s in parent.get("sources", [])
            ]
    return record


def _train_step(
    unet, opt, scheduler, batch, gen, t_min: int = 0, loss_kind: str = "v", precision="fp32"
) -> float:
    """One update. The draws come from the CPU generator ``gen`` (the same on every device); the batch moves
    to the network's device; with ``precision`` bf16 the forward runs under autocast, the loss in fp32."""
    device = next(unet.parameters()).device
    acp = scheduler.alphas_cumprod.to(device)
    t = torch.randint(t_min, scheduler.config.num_train_timesteps, (batch.shape[0],), generator=gen)
    eps = torch.randn(batch.shape, generator=gen)
    batch, t, eps = batch.to(device), t.to(device), eps.to(device)
    x_t = add_noise(batch, eps, t, acp)
    with (
        torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        if precision == "bf16"
        else nullcontext()
    ):
        out = unet(x_t, t).sample
    eps_hat = eps_from_output(out.float(), x_t, t, acp, scheduler.config.prediction_type)
    weight = (
        (1.0 / acp[t]).float() if loss_kind == "v" else torch.ones(len(t), device=device)
    )  # 1/ᾱ_t: v-prediction loss
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
    unet.to(resolve_device(cfg.device)).train().requires_grad_(True)
    ema = EMAModel(unet.parameters(), decay=cfg.ema_decay, use_ema_warmup=True)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, cfg))
    synth, natural = (torch.from_numpy(p) for p in training_pool(cfg))
    n_synth = cfg.batch_size - round(cfg.batch_size * cfg.natural_share)
    start = time.perf_counter()
    with open(out_dir / "train_log.csv", "w", newline="") as log_file:
        log = csv.writer(log_file)
        log.writerow(["step", "loss", "lr", "seconds"])
        for step in range(cfg.steps):
            s_idx = torch.randint(0, len(synth), (n_synth,), generator=gen)
            f_idx = torch.randint(0, len(natural), (cfg.batch_size - n_synth,), generator=gen)
            batch = _augment(torch.cat([synth[s_idx], natural[f_idx]]), gen)
            loss = _train_step(unet, opt, scheduler, batch, gen, cfg.t_min, cfg.loss, cfg.precision)
            sched.step()
            ema.step(unet.parameters())
            if step % cfg.log_every == 0 or step == cfg.steps - 1:
                log.writerow(
                    [
                        step,
                        f"{loss:.6g}",
                        f"{sched.get_last_lr()[0]:.3g}",
                        f"{time.perf_counter() - start:.1f}",
                    ]
                )
                log_file.flush()
            if cfg.snapshot_every and (step + 1) % cfg.snapshot_every == 0:
                _snapshot(out_dir / "snapshot", unet, ema, scheduler)
            if progress is not None:
                progress(step + 1, loss)
    seconds = time.perf_counter() - start
    ema.copy_to(unet.parameters())
    unet.eval().requires_grad_(False).to("cpu")  # saved and evaluated on the CPU, as it is shipped
    save_denoiser(out_dir, unet, scheduler)
    record = _training_record(cfg)
    (out_dir / TRAINING_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    quality = held_out_quality(unet, scheduler, n=cfg.quality_images, record=record)
    _write_model_card(out_dir, cfg, seconds, quality, record)
    return out_dir


def _snapshot(folder: Path, unet, ema, scheduler) -> None:
    """Save the current EMA weights without disturbing training."""
    ema.store(unet.parameters())
    ema.copy_to(unet.parameters())
    save_denoiser(folder, unet, scheduler)
    ema.restore(unet.parameters())


def _held_out_lfw(record: dict | None, which: str) -> np.ndarray:
    """LFW rows of ``which`` that no source of ``record`` lists (faces 80..99 without a record: the old recipe)."""
    if record is None:
        return np.arange(FACES_TRAIN if which == "faces" else 0, LFW_FACES)
    used = np.zeros(LFW_FACES, dtype=bool)
    for source in record.get("sources", []):
        if source["kind"] == "lfw" and source["which"] == which:
            used[source["indices"][0] : source["indices"][1]] = True
    return np.flatnonzero(~used)


@torch.no_grad()
def held_out_quality(
    unet,
    scheduler,
    *,
    n: int = 100,
    timesteps=QUALITY_TIMESTEPS,
    seed: int = 12345,
    record: dict | None = None,
) -> list[dict]:
    """ε-MSE and x₀-MSE of the model and of the trivial predictor on held-out images.

    Held out: synthetic images 0..n-1 of seed 0 in colour and in gray (the training pools use other
    generators), and the LFW faces and non-faces ``record`` does not list (at most n of each). One
    fixed noise draw per image and timestep.
    """
    sets = {
        "synthetic": torch.from_numpy(synthetic_images(n, seed=0)[0]),
        "synthetic_gray": torch.from_numpy(synthetic_images(n, seed=0, gray=True)[0]),
        "faces": torch.from_numpy(lfw_images("faces")[_held_out_lfw(record, "faces")][:n]),
        "nonfaces": torch.from_numpy(lfw_images("nonfaces")[_held_out_lfw(record, "nonfaces")][:n]),
    }
    acp = scheduler.alphas_cumprod
    rows = []
    for name, x0 in sets.items():
        if len(x0) == 0:
            continue
        for t_val in timesteps:
            gen = torch.Generator().manual_seed(seed + t_val)
            eps = torch.randn(x0.shape, generator=gen)
            t = torch.full((x0.shape[0],), t_val, dtype=torch.long)
            x_t = add_noise(x0, eps, t, acp)
            pred = eps_from_output(
                unet(x_t, t).sample, x_t, t, acp, scheduler.config.prediction_type
            )
            base = trivial_eps(x_t, t, acp)
            rows.append(
                dict(
                    dataset=name,
                    timestep=t_val,
                    n_images=int(x0.shape[0]),
                    eps_mse=float(eps_mse_per_image(pred, eps).mean()),
                    eps_mse_trivial=float(eps_mse_per_image(base, eps).mean()),
                    x0_mse=float(x0_mse_per_image(implied_x0(x_t, pred, t, acp), x0).mean()),
                    x0_mse_trivial=float(
                        x0_mse_per_image(implied_x0(x_t, base, t, acp), x0).mean()
                    ),
                )
            )
    return rows


def _ranges(indices: np.ndarray) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2, 5"`` (``"none"`` when empty)."""
    if len(indices) == 0:
        return "none"
    breaks = np.flatnonzero(np.diff(indices) != 1)
    starts, ends = np.r_[indices[0], indices[breaks + 1]], np.r_[indices[breaks], indices[-1]]
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in zip(starts, ends))


def _data_lines(cfg: TrainConfig, record: dict) -> list[str]:
    """The model card's account of the training data and of what stayed held out."""
    if cfg.composition == "faces80":
        data = "its synthetic shapes (seed 1,000,003, colour) and LFW faces 0-79"
    else:
        data = (
            f"{cfg.synthetic_pool:,} synthetic shapes of the training namespace ({cfg.gray_share:.0%} gray) and "
            f"{cfg.photo_pool:,} random crops of {len(TRAIN_PHOTOS)} scikit-image sample photographs"
        )
    lines = [
        f"Trained by diffcircuit on {data}; see `diffcircuit.models.tiny` and `{TRAINING_RECORD}`."
    ]
    if len(record["sources"]) > len(training_sources(cfg)):
        lines.append(
            f"Fine-tuned from `{cfg.init_from}`, whose training data (listed in `{TRAINING_RECORD}`) it inherits."
        )
    if not record["complete"]:
        lines.append(f"Its training data are not fully known: {record.get('note', '')}.")
    return lines


def _write_model_card(
    out_dir: Path, cfg: TrainConfig, seconds: float, quality: list[dict], record: dict | None = None
) -> None:
    record = record or _training_record(cfg)
    n_params = sum(p.numel() for p in build_tiny_unet().parameters())
    (out_dir / "quality.json").write_text(json.dumps(quality, indent=2) + "\n")
    lines = [
        "# tiny-ddpm-32: diffcircuit's embedded default model",
        "",
        f"A DDPM `UNet2DModel` ({n_params:,} parameters; 32x32 RGB; attention at 16x16 and 8x8,",
        f"7 attention layers, 72 heads of dim 8), {cfg.prediction} (diffusers' prediction_type), 1,000 linear-β steps.",
        *_data_lines(cfg, record),
        "",
        "## Training",
        "",
        "```",
        "diffcircuit train-tiny --out DIR "
        + " ".join(
            f"--{k.replace('_', '-')} {v}"
            for k, v in asdict(cfg).items()
            if k
            in (
                "steps",
                "batch_size",
                "lr",
                "seed",
                "init_from",
                "t_min",
                "loss",
                "prediction",
                "natural_share",
                "composition",
                "synthetic_pool",
                "photo_pool",
                "gray_share",
            )
            and v is not None
        ),
        "```",
        "",
        f"{cfg.steps} steps of batch {cfg.batch_size} ({cfg.natural_share:.0%} natural) in {seconds / 60:.1f} min on a 2-core CPU;",
        "loss: "
        + ("‖ε̂ − ε‖²/ᾱ_t = ‖v̂ − v‖² (the v-prediction loss)" if cfg.loss == "v" else "plain ε-MSE")
        + ", AdamW, cosine LR, EMA of weights",
        f"(decay {cfg.ema_decay}). Full settings: `" + json.dumps(asdict(cfg)) + "`.",
        "",
        "## Held-out quality",
        "",
        "Synthetic: seed-0 images 0-99, in colour and gray (never trained on). Faces and non-faces: the LFW images",
        f"no source in `{TRAINING_RECORD}` lists ("
        + ", ".join(f"{w} {_ranges(_held_out_lfw(record, w))}" for w in ("faces", "nonfaces"))
        + ").",
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
