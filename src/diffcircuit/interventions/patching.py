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
from diffcircuit.interventions.stack import (
    TiledForward,
    rows_per_forward,
    stack_chunks,
    stacked_outputs,
    tile,
)
from diffcircuit.interventions.sweep import clean_activations
from diffcircuit.models.noise import batch_rows, noisy_batch

__all__ = ["activation_patching"]


def _patched(den, registry, target: Target, source: dict, modules: dict, forward_from):
    if target.level == "resnet":
        with resnet_intervention(modules[target.name], replace=lambda r: source[target.name].to(r)):
            return forward_from([target.name])
    with instrument(
        den, registry=registry, patches={a: source[a.layer][:, a.head] for a in target.heads}
    ):
        return forward_from([a.layer for a in target.heads])


def _pair_rows(t_val: int, idx: np.ndarray, target: Target, pred_a, pred_b, pred) -> pd.DataFrame:
    """``moved_frac`` and ``delta_mse`` of each pair, from the source's, the receiver's and the patched output."""
    toward = (pred_a - pred_b).flatten(1)
    moved = (pred - pred_b).flatten(1)
    norm = toward.pow(2).sum(1)
    frac = torch.where(
        norm > 0, (moved * toward).sum(1) / norm.clamp_min(1e-30), torch.zeros_like(norm)
    )
    return pd.DataFrame(
        {
            "timestep": t_val,
            "pair": idx,
            "level": target.level,
            "target": target.name,
            "layer": target.layer,
            "head": target.head,
            "moved_frac": frac.cpu().double().numpy(),
            "delta_mse": moved.pow(2).mean(1).cpu().double().numpy(),
        }
    )


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
    stack_rows: int | None = None,
    memory_budget: int | None = None,
) -> pd.DataFrame:
    """One row per target x timestep x pair: ``moved_frac`` and ``delta_mse``. ``datasets`` names the source's
    and the receiver's dataset (captioned datasets feed each image its own caption).

    Both are measured in the network's own output space (its ``prediction_type``): the receiver's
    output moved toward the source's. Converting to ε would add √(1−ᾱ)·(x_a − x_b), an input
    difference no internal patch can move, and make ``moved_frac`` depend on the parametrisation.

    Head and layer patches run stacked (``interventions.stack``: several targets' copies of the batch in one
    forward, ``stack_rows`` / ``memory_budget`` bound its rows), equal to one forward per target (tested).
    """
    src = torch.from_numpy(np.asarray(source_images, dtype=np.float32))
    rcv = torch.from_numpy(np.asarray(receiver_images, dtype=np.float32))
    n = min(len(src), len(rcv))
    registry = registry or probe_registry(denoiser, rcv[:1])
    resnets = [
        (name, m)
        for name, m in resnet_blocks(denoiser.network)
        if any(t.name == name for t in targets)
    ]
    stages, rows = prefix_runner(denoiser), []
    for t_val in timesteps:
        for idx in batch_rows(n, batch_size):
            # the source and its receiver share one noise draw (keyed "pair"), each with its own captions
            a = noisy_batch(
                denoiser, src[idx], idx, t_val, seed=seed, dataset=datasets[0], noise="pair"
            )
            b = noisy_batch(
                denoiser, rcv[idx], idx, t_val, seed=seed, dataset=datasets[1], noise="pair"
            )
            pred_a, source = clean_activations(
                denoiser, registry, a.x_t, a.t, resnets, rows=a.which
            )
            record: dict = {}
            pred_b = stages.run(b.x_t, b.t, rows=b.which, record=record)

            def forward_from(names, _r=record, _b=b):
                return (
                    stages.resume(names, _r)
                    if stages.supported
                    else denoiser.predict(_b.x_t, _b.t, rows=_b.which)
                )

            tiled = TiledForward(
                denoiser, stages, record, b.x_t, b.t, b.dataset, idx, stages.supported
            )
            cap = rows_per_forward(
                record, len(idx), b.x_t.device, stack_rows=stack_rows, memory_budget=memory_budget
            )
            jobs = [(k, tg.heads) for k, tg in enumerate(targets) if tg.level in ("head", "layer")]
            preds = {}
            for chunk in stack_chunks(
                registry, jobs, len(idx), cap
            ):  # the source's activation, per copy
                preds |= stacked_outputs(
                    tiled,
                    registry,
                    chunk,
                    lambda layer, copies, _s=source, _b=tiled.batch: tile(_s[layer], copies, _b),
                )
            for k, target in enumerate(targets):
                pred = preds.get(k)
                if pred is None:
                    pred = _patched(denoiser, registry, target, source, dict(resnets), forward_from)
                rows.append(_pair_rows(t_val, idx, target, pred_a, pred_b, pred))
            if progress is not None:
                progress(len(idx))
    frame = pd.concat(rows, ignore_index=True)
    frame["head"] = frame["head"].astype("Int64")
    return frame
