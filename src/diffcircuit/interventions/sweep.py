"""Run a set of ablations over images and timesteps and tabulate the degradation they cause.

Per timestep: one pass over the reference images collects each target's mean and standard deviation
(for ``mean`` and ``noise``) — by default the evaluated images themselves (in-sample), or any other
images (``reference``: e.g. held-out images of the same dataset, so that no evaluated image's own
activation is part of the value that replaces it); then, per batch, the clean prediction, the partner images'
activations (for ``resample``) and one intervened forward per target x method. Every random draw
is keyed by image, timestep and target, so results do not depend on the batch size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from diffcircuit.errors import ConfigError
from diffcircuit.instrument.registry import HeadRegistry
from diffcircuit.instrument.session import instrument, probe_registry
from diffcircuit.interventions.ablation import METHODS, Target, resnet_blocks, resnet_intervention
from diffcircuit.interventions.prefix import prefix_runner
from diffcircuit.interventions.stack import (
    TiledForward,
    rows_per_forward,
    stack_chunks,
    stacked_outputs,
)
from diffcircuit.models.diffusion import eps_mse_per_image, implied_x0, x0_mse_per_image
from diffcircuit.models.noise import batch_noise, batch_rows, noisy_batch

__all__ = [
    "ActivationMoments",
    "ReferenceImages",
    "ablation_sweep",
    "clean_activations",
    "reference_moments",
    "x0_psnr",
]


@dataclass(frozen=True, eq=False)
class ReferenceImages:
    """Images whose activations give mean ablation's mean: ``images`` ``[m, C, H, W]`` are rows ``index`` of
    ``dataset`` (their noise draws and captions are those of these rows)."""

    dataset: str
    images: np.ndarray
    index: np.ndarray


class ActivationMoments:
    """Running sum and sum of squares of every cached activation, per key."""

    def __init__(self):
        self.n, self.sums, self.squares = 0, {}, {}

    def add(self, acts: dict[str, torch.Tensor]) -> None:
        for key, value in acts.items():
            v = value.double()
            self.sums[key] = self.sums.get(key, 0) + v.sum(0)
            self.squares[key] = self.squares.get(key, 0) + v.pow(2).sum(0)
        self.n += next(iter(acts.values())).shape[0]

    def mean(self, key: str) -> torch.Tensor:
        return (self.sums[key] / self.n).float()

    def std(self, key: str) -> torch.Tensor:
        var = self.squares[key] / self.n - (self.sums[key] / self.n) ** 2
        return var.clamp_min(0).sqrt().float()


def x0_psnr(mse):
    """PSNR in dB of an x₀ prediction with pixels in [-1, 1] (data range 2): 10·log10(4 / MSE)."""
    return 10 * np.log10(4.0 / np.asarray(mse, dtype=np.float64))


def clean_activations(
    denoiser, registry, x_t, t, resnets, *, rows=None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Prediction (``Denoiser.predict``'s, for images ``rows``) and every activation an ablation can target:
    ``layer`` -> [B, h, Q, d], resnet -> [B, C, H, W]."""
    records = {name: [] for name, _ in resnets}
    with ExitStack() as stack:
        session = stack.enter_context(
            instrument(denoiser, registry=registry, cache_heads=[i.layer for i in registry.layers])
        )
        for name, module in resnets:
            stack.enter_context(resnet_intervention(module, record=records[name]))
        pred = denoiser.predict(x_t, t, rows=rows)
    acts = session.pop("head_out")
    acts |= {name: rec[0].cpu() for name, rec in records.items()}
    return pred, acts


@torch.no_grad()
def reference_moments(
    denoiser,
    registry,
    references: Sequence[ReferenceImages],
    t_val: int,
    *,
    seed: int,
    batch_size: int,
    resnets=(),
) -> ActivationMoments:
    """Mean and SD of every cached activation over all ``references`` images at timestep ``t_val``."""
    moments = ActivationMoments()
    for ref in references:
        x_all = torch.from_numpy(np.asarray(ref.images, dtype=np.float32))
        for local in batch_rows(len(x_all), batch_size):
            b = noisy_batch(
                denoiser,
                x_all[local],
                np.asarray(ref.index)[local],
                t_val,
                seed=seed,
                dataset=ref.dataset,
            )
            moments.add(clean_activations(denoiser, registry, b.x_t, b.t, resnets, rows=b.which)[1])
    return moments


def _replacement(
    method: str, key: str, index: int | None, ref: ActivationMoments, partner: dict, draw
):
    """The value that replaces activation ``key`` (its head ``index``, if a head) under ``method``."""
    if method == "zero":
        return 0.0
    if method == "resample":
        value = partner[key]  # [B, h, Q, d] for a layer, [B, C, H, W] for a ResNet branch
        return value if index is None else value[:, index]
    mean, std = ref.mean(key), ref.std(key)
    if index is not None:
        mean, std = mean[index], std[index]
    return mean if method == "mean" else mean + std * draw(tuple(mean.shape))


def _intervened(
    den, registry, target: Target, method, ref, partner, draw, resnet_modules, forward_from
):
    """The intervened prediction; ``forward_from(first touched module names)`` runs the (partial) forward."""
    if target.level == "token":
        if method != "zero":
            raise ConfigError(
                "a token can only be removed (method zero) or reweighted (target token:J*W)"
            )
        with instrument(
            den,
            registry=registry,
            token_scales={a: {target.token: target.weight} for a in target.heads},
        ):
            return forward_from(list(dict.fromkeys(a.layer for a in target.heads)))
    if target.level == "resnet":
        value = _replacement(method, target.name, None, ref, partner, draw)
        replace = (
            (lambda r: torch.zeros_like(r))
            if method == "zero"
            else (lambda r: value.to(r).expand_as(r))
        )
        with resnet_intervention(resnet_modules[target.name], replace=replace):
            return forward_from([target.name])
    patches = {a: _replacement(method, a.layer, a.head, ref, partner, draw) for a in target.heads}
    with instrument(den, registry=registry, patches=patches):
        return forward_from([a.layer for a in target.heads])


_STACKABLE = (
    "head",
    "layer",
    "block",
    "all",
    "random",
)  # head-set targets; zero and mean ablation stack


def _stack_plan(
    registry: HeadRegistry, targets: Sequence[Target], methods: Sequence[str], batch: int, rows: int
) -> list[tuple[str, list]]:
    """(method, chunk of (target index, heads)) that run stacked: head-set targets under zero or mean ablation."""
    jobs = [(k, tg.heads) for k, tg in enumerate(targets) if tg.level in _STACKABLE]
    return [
        (m, chunk)
        for m in methods
        if m in ("zero", "mean")
        for chunk in stack_chunks(registry, jobs, batch, rows)
    ]


def _batch_rows(
    den,
    registry,
    batch,
    targets,
    methods,
    ref,
    partner,
    stages,
    resnets,
    *,
    seed: int,
    prefix_reuse: bool,
    stack_rows: int | None,
    memory_budget: int | None,
) -> list[pd.DataFrame]:
    """One batch's rows: its clean prediction (recording the prefix state), then every target x method,
    stacked where they stack, one (partial) forward each otherwise."""
    acp, x_t, t, idx = den.alphas_cumprod, batch.x_t, batch.t, batch.rows
    reuse = prefix_reuse and stages.supported
    record: dict = {}
    clean = (
        stages.run(x_t, t, rows=batch.which, record=record)
        if prefix_reuse
        else den.predict(x_t, t, rows=batch.which)
    )

    def forward_from(names):
        return stages.resume(names, record) if reuse else den.predict(x_t, t, rows=batch.which)

    clean = den.eps_hat(clean, x_t, t)
    mse_clean = eps_mse_per_image(clean, batch.eps)
    x0_clean = x0_mse_per_image(implied_x0(x_t, clean, t, acp), batch.x0)
    tiled = TiledForward(den, stages, record, x_t, t, batch.dataset, idx, reuse)
    rows = rows_per_forward(
        record, len(idx), x_t.device, stack_rows=stack_rows, memory_budget=memory_budget
    )
    preds = {}
    for method, chunk in _stack_plan(registry, targets, methods, len(idx), rows):
        value = (
            (lambda layer, copies: 0.0)
            if method == "zero"
            else (lambda layer, copies: ref.mean(layer))
        )
        preds |= {
            (k, method): pred for k, pred in stacked_outputs(tiled, registry, chunk, value).items()
        }
    out = []
    for k, target in enumerate(targets):
        for method in methods:

            def draw(shape, _name=target.name):  # keyed by the target's identity, not its position
                return batch_noise(
                    shape,
                    seed=seed,
                    dataset=f"{batch.dataset}/noise/{_name}",
                    images=idx,
                    timestep=batch.timestep,
                )

            pred = preds.get((k, method))
            if pred is None:
                pred = _intervened(
                    den, registry, target, method, ref, partner, draw, dict(resnets), forward_from
                )
            pred = den.eps_hat(pred, x_t, t)
            mse = eps_mse_per_image(pred, batch.eps)
            out.append(
                pd.DataFrame(
                    {
                        "dataset": batch.dataset,
                        "timestep": batch.timestep,
                        "image": idx,
                        "level": target.level,
                        "target": target.name,
                        "n_heads": len(target.heads),
                        "layer": target.layer,
                        "head": target.head,
                        "method": "reweight" if target.weight else method,
                        "mse_clean": mse_clean.cpu().double().numpy(),
                        "mse_intervened": mse.cpu().double().numpy(),
                        "degradation_pct": (100 * (mse - mse_clean) / mse_clean)
                        .cpu()
                        .double()
                        .numpy(),
                        "x0_mse_clean": x0_clean.cpu().double().numpy(),
                        "x0_mse_intervened": x0_mse_per_image(
                            implied_x0(x_t, pred, t, acp), batch.x0
                        )
                        .cpu()
                        .double()
                        .numpy(),
                    }
                )
            )
    return out


@torch.no_grad()
def ablation_sweep(
    denoiser,
    images: np.ndarray,
    *,
    targets: Sequence[Target],
    methods: Sequence[str] = ("zero",),
    timesteps: Sequence[int],
    seed: int = 0,
    dataset: str = "a",
    batch_size: int = 50,
    registry: HeadRegistry | None = None,
    prefix_reuse: bool = True,
    progress: Callable[[int], None] | None = None,
    reference: Sequence[ReferenceImages] | None = None,
    stack_rows: int | None = None,
    memory_budget: int | None = None,
) -> pd.DataFrame:
    """One row per target x method x timestep x image: clean and intervened ε- and x₀-MSE.

    Head-set targets (heads, layers, blocks, all heads, random sets) under zero and mean ablation run stacked:
    as many variants as the rows of one forward allow share it, each on its own copy of the batch (per-row head
    masks), equal to one forward per variant (tested to 1e-5). Rows per forward: ``stack_rows`` (default 64 on a
    CPU) within ``memory_budget`` bytes on an accelerator (``interventions.stack``); ``stack_rows`` below twice the
    batch turns stacking off.

    ``reference``: the images whose mean (and SD) ``mean`` and ``noise`` ablation use; None: ``images``
    themselves (rows 0..n-1 of ``dataset``, in-sample). With ``prefix_reuse`` (UNet2DModel), each intervened forward restarts from the first block the
    intervention touches, from the clean run's recorded state; results equal the full forward's.
    """
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ConfigError(f"unknown ablation methods {bad}; choose from {METHODS}")
    x_all = torch.from_numpy(np.asarray(images, dtype=np.float32))
    n = len(x_all)
    registry = registry or probe_registry(denoiser, x_all[:1])
    resnets = [
        (name, m)
        for name, m in resnet_blocks(denoiser.network)
        if any(t.name == name for t in targets)
    ]
    stages = prefix_runner(denoiser)
    if reference is None:
        reference = [ReferenceImages(dataset=dataset, images=x_all.numpy(), index=np.arange(n))]
    rows = []
    for t_val in timesteps:
        ref = ActivationMoments()
        if {"mean", "noise"} & set(methods):
            ref = reference_moments(
                denoiser,
                registry,
                reference,
                t_val,
                seed=seed,
                batch_size=batch_size,
                resnets=resnets,
            )
        for idx in batch_rows(n, batch_size):
            batch = noisy_batch(denoiser, x_all[idx], idx, t_val, seed=seed, dataset=dataset)
            partner = {}
            if (
                "resample" in methods
            ):  # image i takes image i+1's activation (its own caption, if any)
                other = noisy_batch(
                    denoiser, x_all[(idx + 1) % n], (idx + 1) % n, t_val, seed=seed, dataset=dataset
                )
                partner = clean_activations(
                    denoiser, registry, other.x_t, batch.t, resnets, rows=other.which
                )[1]
            rows += _batch_rows(
                denoiser,
                registry,
                batch,
                targets,
                methods,
                ref,
                partner,
                stages,
                resnets,
                seed=seed,
                prefix_reuse=prefix_reuse,
                stack_rows=stack_rows,
                memory_budget=memory_budget,
            )
            if progress is not None:
                progress(len(idx))
    frame = pd.concat(rows, ignore_index=True)
    frame["head"] = frame["head"].astype("Int64")
    frame["x0_psnr_clean"] = x0_psnr(frame.x0_mse_clean)
    frame["x0_psnr_intervened"] = x0_psnr(frame.x0_mse_intervened)
    return frame
