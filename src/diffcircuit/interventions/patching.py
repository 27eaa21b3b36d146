"""Activation patching between distributions: put a component's activation from image A into image B.

Images are paired by index (source A_i, receiver B_i). Both are noised with the *same* noise draw
at the same timestep; the receiver's forward is run with the target's activation (a head's output
slice, every head of a layer, or a ResNet block's residual branch) replaced by the source's.
With p_A, p_B the clean ε-predictions and p the patched one:

- ``moved_frac`` = ⟨p − p_B, p_A − p_B⟩ / ‖p_A − p_B‖²: how far the output moved toward the source's
  (0 = not at all, 1 = all the way along the line between them);
- ``delta_mse`` = mean (p − p_B)²: how much the output changed at all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import torch

from diffcircuit.instrument.registry import HeadRegistry
from diffcircuit.instrument.session import instrument, probe_registry
from diffcircuit.interventions.ablation import Target, resnet_blocks, resnet_intervention
from diffcircuit.interventions.prefix import prefix_runner
from diffcircuit.interventions.sweep import clean_activations
from diffcircuit.metrics.observe import batch_noise
from diffcircuit.models.conditioning import images_of
from diffcircuit.models.diffusion import add_noise, model_device

__all__ = ["activation_patching"]


def _patched(net, registry, target: Target, source: dict, modules: dict, forward_from):
    if target.level == "resnet":
        with resnet_intervention(modules[target.name], replace=lambda r: source[target.name].to(r)):
            return forward_from([target.name])
    with instrument(net, registry=registry, patches={a: source[a.layer][:, a.head] for a in target.heads}):
        return forward_from([a.layer for a in target.heads])


@torch.no_grad()
def activation_patching(
    denoiser,
    source_images: np.ndarray,
    receiver_images: np.ndarray,
    *,
    targets: Sequence[Target],
    timesteps: Sequence[int],
    seed: int = 0,
    batch_size: int = 50,
    registry: HeadRegistry | None = None,
    progress: Callable[[int], None] | None = None,
    datasets: tuple[str, str] = ("b", "a"),
) -> pd.DataFrame:
    """One row per target x timestep x pair: ``moved_frac`` and ``delta_mse``. ``datasets`` names the source's
    and the receiver's dataset (captioned datasets feed each image its own caption).

    Both are measured in the network's own output space (its ``prediction_type``): the receiver's
    output moved toward the source's. Converting to ε would add √(1−ᾱ)·(x_a − x_b), an input
    difference no internal patch can move, and make ``moved_frac`` depend on the parametrisation.
    """
    net, acp = denoiser.network, denoiser.alphas_cumprod
    src = torch.from_numpy(np.asarray(source_images, dtype=np.float32))
    rcv = torch.from_numpy(np.asarray(receiver_images, dtype=np.float32))
    n, device = min(len(src), len(rcv)), model_device(net)
    registry = registry or probe_registry(net, rcv[:1].to(device), torch.zeros(1, dtype=torch.long, device=device))
    resnets = [(name, m) for name, m in resnet_blocks(net) if any(t.name == name for t in targets)]
    stages, rows = prefix_runner(net), []
    for t_val in timesteps:
        for start in range(0, n, batch_size):
            idx = np.arange(start, min(start + batch_size, n))
            eps = batch_noise(rcv.shape[1:], seed=seed, dataset="pair", images=idx, timestep=t_val).to(device)
            t = torch.full((len(idx),), t_val, dtype=torch.long, device=device)
            with images_of(net, datasets[0], idx):
                pred_a, source = clean_activations(net, registry, add_noise(src[idx].to(device), eps, t, acp), t, resnets)
            record: dict = {}
            x_b = add_noise(rcv[idx].to(device), eps, t, acp)
            with images_of(net, datasets[1], idx):
                pred_b = stages.run(x_b, t, record=record)

            def forward_from(names, _r=record, _x=x_b, _t=t):
                return stages.resume(names, _r) if stages.supported else net(_x, _t).sample

            toward = (pred_a - pred_b).flatten(1)
            for target in targets:
                with images_of(net, datasets[1], idx):
                    pred = _patched(net, registry, target, source, dict(resnets), forward_from)
                moved = (pred - pred_b).flatten(1)
                norm = toward.pow(2).sum(1)
                frac = torch.where(norm > 0, (moved * toward).sum(1) / norm.clamp_min(1e-30), torch.zeros_like(norm))
                rows.append(pd.DataFrame({
                    "timestep": t_val, "pair": idx, "level": target.level, "target": target.name,
                    "layer": target.layer, "head": target.head,
                    "moved_frac": frac.cpu().double().numpy(), "delta_mse": moved.pow(2).mean(1).cpu().double().numpy(),
                }))
            if progress is not None:
                progress(len(idx))
    frame = pd.concat(rows, ignore_index=True)
    frame["head"] = frame["head"].astype("Int64")
    return frame
