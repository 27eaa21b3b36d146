"""All single-head zero ablations on a batch: the project's sweep against a naive loop, in one run.

The naive loop runs one full forward per head with that head zero-ablated. The project's sweep
(``ablation_sweep``, prefix reuse on) restarts each forward at the head's block from the clean
run's recorded state. Both are timed on the same batch; their results must agree to 1e-5.
The last line is ``sweep_ratio: <project time / naive loop time>``.

``--family dit`` times a DiT-style transformer instead of the embedded UNet (random weights, 8 blocks of
4 heads on a 16x16 patch grid, class-conditional), where prefix reuse memoises whole transformer blocks.

    .venv/bin/python benchmarks/ablation_sweep.py [--n 64] [--timestep 500] [--family embedded|dit]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from diffcircuit import instrument, load_denoiser, load_images, probe_registry
from diffcircuit.interventions.ablation import targets
from diffcircuit.interventions.sweep import ablation_sweep
from diffcircuit.models.loading import load_conditioned
from diffcircuit.models.noise import image_noise


@torch.no_grad()
def naive_loop(den, images, registry, timestep: int) -> np.ndarray:
    x0 = torch.from_numpy(np.asarray(images))
    eps = torch.stack(
        [
            image_noise(x0.shape[1:], seed=0, dataset="a", image=i, timestep=timestep)
            for i in range(len(x0))
        ]
    )
    t = torch.full((len(x0),), timestep)
    x_t = den.scheduler.add_noise(x0, eps, t)
    out = []
    for address in registry:
        with instrument(den.network, registry=registry, zero_heads=[address]):
            eps_hat = den.eps_hat(
                den.network(x_t, t).sample, x_t, t
            )  # the ε the model's output implies
            out.append(((eps_hat - eps) ** 2).flatten(1).mean(1).numpy())
    return np.concatenate(out)


def dit(folder):
    """A DiT-style class-conditional transformer with random weights, saved as a pipeline folder and loaded."""
    from diffusers import DDPMScheduler, DiTTransformer2DModel

    torch.manual_seed(0)
    DiTTransformer2DModel(
        num_attention_heads=4,
        attention_head_dim=32,
        in_channels=3,
        out_channels=6,
        num_layers=8,
        sample_size=32,
        patch_size=2,
        num_embeds_ada_norm=10,
    ).save_pretrained(folder / "transformer")
    DDPMScheduler().save_pretrained(folder / "scheduler")
    return load_conditioned(str(folder), class_label=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--timestep", type=int, default=500)
    parser.add_argument("--family", choices=("embedded", "dit"), default="embedded")
    args = parser.parse_args()
    import tempfile
    from pathlib import Path

    den = load_denoiser() if args.family == "embedded" else dit(Path(tempfile.mkdtemp()))
    data = load_images("faces", n=args.n, size=den.sample_size, channels=den.in_channels)
    registry = probe_registry(
        den, torch.from_numpy(data.images[:1]), torch.zeros(1, dtype=torch.long)
    )
    heads = targets(registry, "head")
    naive_loop(den, data.images[:4], registry, args.timestep)  # warm-up
    start = time.perf_counter()
    slow = naive_loop(den, data.images, registry, args.timestep)
    t_naive = time.perf_counter() - start
    start = time.perf_counter()
    table = ablation_sweep(
        den,
        data.images,
        targets=heads,
        methods=["zero"],
        timesteps=[args.timestep],
        seed=0,
        dataset="a",
        batch_size=args.n,
        registry=registry,
    )
    t_sweep = time.perf_counter() - start
    fast = table.mse_intervened.to_numpy()
    diff = np.abs(fast - slow).max()
    print(
        f"{args.family}  threads: {torch.get_num_threads()}  batch: {args.n}  heads: {len(heads)}"
    )
    print(
        f"naive loop: {t_naive:.2f} s   project sweep: {t_sweep:.2f} s   max |difference|: {diff:.2e}"
    )
    assert diff <= 1e-5 * max(1.0, np.abs(slow).max()), "sweep and naive loop disagree"
    print(f"sweep_ratio: {t_sweep / t_naive:.3f}")


if __name__ == "__main__":
    main()
