"""The paper's scale: a 113.7M-parameter 256x256 UNet, observation + every single-head ablation.

Builds a UNet2DModel from the published google/ddpm-celebahq-256 configuration (random weights:
timing does not depend on them) and runs the run's own observation shards (``protocol.tasks``) and
the single-head ablation sweep (zero and mean) on synthetic images at 10 timesteps, printing
images/s per stage and the total. The full size is 4,000 images x 10 timesteps, meant for a GPU
(aim: the whole protocol in <= 10 minutes on one H100). On a CPU the default is a reduced run
whose throughput is reported with the projected full-size time.

    .venv/bin/python benchmarks/paper_scale.py [--n 4000] [--timesteps 50,150,...] [--device cuda]
                                               [--precision bf16] [--batch 64] [--ablate-n 4000]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

# google/ddpm-celebahq-256's unet/config.json (diffusers), the architecture the paper's protocol names
CELEBAHQ_256 = dict(
    sample_size=256,
    in_channels=3,
    out_channels=3,
    layers_per_block=2,
    block_out_channels=(128, 128, 256, 256, 512, 512),
    down_block_types=(
        "DownBlock2D",
        "DownBlock2D",
        "DownBlock2D",
        "DownBlock2D",
        "AttnDownBlock2D",
        "DownBlock2D",
    ),
    up_block_types=(
        "UpBlock2D",
        "AttnUpBlock2D",
        "UpBlock2D",
        "UpBlock2D",
        "UpBlock2D",
        "UpBlock2D",
    ),
    attention_head_dim=None,
    act_fn="silu",
    center_input_sample=False,
    downsample_padding=0,
    flip_sin_to_cos=False,
    freq_shift=1,
    mid_block_scale_factor=1,
    norm_eps=1e-6,
    norm_num_groups=32,
    time_embedding_type="positional",
)
FULL_N, FULL_T = 4000, tuple(range(50, 1000, 100))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    from diffusers import DDPMScheduler, UNet2DModel

    from diffcircuit.interventions.ablation import targets
    from diffcircuit.interventions.sweep import ablation_sweep
    from diffcircuit.models.loading import save_denoiser
    from diffcircuit.protocol.config import RunConfig
    from diffcircuit.protocol.tasks import Context, compute, observe_tasks

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--n", type=int, help=f"images (default {FULL_N} on a GPU, 8 on the CPU)")
    parser.add_argument("--ablate-n", type=int, help="images for the ablation stage (default: --n)")
    parser.add_argument("--timesteps", help="default: 10 timesteps on a GPU, 2 on the CPU")
    parser.add_argument("--batch", type=int, help="default 64 on a GPU, 4 on the CPU")
    parser.add_argument("--model-dir", default="/tmp/diffcircuit-celebahq-256-random")
    args = parser.parse_args()
    probe = RunConfig(device=args.device)
    device = probe.torch_device
    gpu = device.startswith("cuda")
    n = args.n or (FULL_N if gpu else 8)
    timesteps = (
        tuple(int(t) for t in args.timesteps.split(","))
        if args.timesteps
        else (FULL_T if gpu else (150, 750))
    )
    ablate_n = args.ablate_n or n
    batch = args.batch or (64 if gpu else 4)

    model_dir = Path(args.model_dir)
    if not (
        model_dir / "model_index.json"
    ).exists():  # the same local-folder path a user's model takes
        torch.manual_seed(0)
        save_denoiser(
            model_dir, UNet2DModel(**CELEBAHQ_256), DDPMScheduler(num_train_timesteps=1000)
        )
    cfg = RunConfig(
        model=str(model_dir),
        data_a="synthetic",
        data_b="synthetic",
        n=n,
        timesteps=timesteps,
        batch_size=batch,
        device=args.device,
        precision=args.precision,
        shard_images=max(n, 1),
    )
    start = time.perf_counter()
    ctx = Context.build(cfg)
    params = sum(p.numel() for p in ctx.den.network.parameters())
    where = torch.cuda.get_device_name() if gpu else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"device: {device} ({where})"
        f"  precision: {args.precision}  parameters: {params / 1e6:.1f}M  heads: {len(ctx.registry)}"
        f"  layers: {len(ctx.registry.layers)}"
    )
    print(f"images: {n} (ablation {ablate_n}) x timesteps {len(timesteps)}  batch: {batch}")

    tasks = [t for t in observe_tasks(ctx, seed=0) if t.args["key"] == "a"]
    _sync(device)
    t0 = time.perf_counter()
    for task in tasks:
        compute(ctx, task)
    _sync(device)
    observe_s = time.perf_counter() - t0
    heads = targets(ctx.registry, "head")
    t0 = time.perf_counter()
    with ctx.autocast():
        ablation_sweep(
            ctx.den,
            ctx.sets["a"].images[:ablate_n],
            targets=heads,
            methods=("zero", "mean"),
            timesteps=timesteps,
            seed=0,
            batch_size=batch,
            registry=ctx.registry,
        )
    _sync(device)
    ablate_s = time.perf_counter() - t0
    forwards = n * len(timesteps)
    print(f"observation: {forwards / observe_s:.1f} image-forwards/s ({observe_s:.1f} s)")
    print(
        f"single-head ablations ({len(heads)} heads x zero, mean): {ablate_n * len(timesteps) / ablate_s:.2f} "
        f"images x timesteps/s ({ablate_s:.1f} s)"
    )
    total = time.perf_counter() - start
    full = FULL_N * len(FULL_T) * (observe_s / forwards + ablate_s / (ablate_n * len(timesteps)))
    print(f"total: {total:.1f} s (including model build and image generation)")
    print(
        f"projected_full_protocol_minutes: {full / 60:.1f}  (4,000 images x 10 timesteps at these rates)"
    )


if __name__ == "__main__":
    main()
