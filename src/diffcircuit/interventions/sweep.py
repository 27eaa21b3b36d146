"""Run a set of ablations over images and timesteps and tabulate the degradation they cause.

Per timestep: one pass over the reference images collects each target's mean and standard deviation
(for ``mean`` and ``noise``) — by default the evaluated images themselves (in-sample), or any other
images (``reference``: e.g. held-out images of the same dataset, so that no evaluated image's own
activation is part of the value that replaces it); then, per batch, the clean prediction, the partner images'
activations (for ``resample``) and one intervened forward per target x method. Every random draw
is keyed by image, timestep and target, so results do not depend on the batch size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from diffcircuit.instrument.registry import HeadRegistry
from diffcircuit.instrument.session import instrument, probe_registry
from diffcircuit.interventions.ablation import METHODS, Target, resnet_blocks, resnet_intervention
from diffcircuit.instrument.hooks import rows_where
from diffcircuit.interventions.prefix import prefix_runner
from diffcircuit.models.diffusion import eps_mse_per_image, implied_x0, x0_mse_per_image
from diffcircuit.models.noise import batch_noise, batch_rows, noisy_batch

__all__ = ["ActivationMoments", "ReferenceImages", "ablation_sweep", "clean_activations", "reference_moments", "x0_psnr"]


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


def clean_activations(denoiser, registry, x_t, t, resnets, *, rows=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Prediction (``Denoiser.predict``'s, for images ``rows``) and every activation an ablation can target:
    ``layer`` -> [B, h, Q, d], resnet -> [B, C, H, W]."""
    records = {name: [] for name, _ in resnets}
    with ExitStack() as stack:
        session = stack.enter_context(instrument(denoiser, registry=registry, cache_heads=[i.layer for i in registry.layers]))
        for name, module in resnets:
            stack.enter_context(resnet_intervention(module, record=records[name]))
        pred = denoiser.predict(x_t, t, rows=rows)
    acts = session.pop("head_out")
    acts |= {name: rec[0].cpu() for name, rec in records.items()}
    return pred, acts


@torch.no_grad()
def reference_moments(denoiser, registry, references: Sequence[ReferenceImages], t_val: int, *, seed: int,
                      batch_size: int, resnets=()) -> ActivationMoments:
    """Mean and SD of every cached activation over all ``references`` images at timestep ``t_val``."""
    moments = ActivationMoments()
    for ref in references:
        x_all = torch.from_numpy(np.asarray(ref.images, dtype=np.float32))
        for local in batch_rows(len(x_all), batch_size):
            b = noisy_batch(denoiser, x_all[local], np.asarray(ref.index)[local], t_val, seed=seed, dataset=ref.dataset)
            moments.add(clean_activations(denoiser, registry, b.x_t, b.t, resnets, rows=b.which)[1])
    return moments


def _replacement(method: str, key: str, index: int | None, ref: ActivationMoments, partner: dict, draw):
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


def _intervened(den, registry, target: Target, method, ref, partner, draw, resnet_modules, forward_from):
    """The intervened prediction; ``forward_from(first touched module names)`` runs the (partial) forward."""
    if target.level == "token":
        if method != "zero":
            raise ValueError("a token can only be removed (method zero) or reweighted (target token:J*W)")
        with instrument(den, registry=registry, token_scales={a: {target.token: target.weight} for a in target.heads}):
            return forward_from(list(dict.fromkeys(a.layer for a in target.heads)))
    if target.level == "resnet":
        value = _replacement(method, target.name, None, ref, partner, draw)
        replace = (lambda r: torch.zeros_like(r)) if method == "zero" else (lambda r: value.to(r).expand_as(r))
        with resnet_intervention(resnet_modules[target.name], replace=replace):
            return forward_from([target.name])
    patches = {a: _replacement(method, a.layer, a.head, ref, partner, draw) for a in target.heads}
    with instrument(den, registry=registry, patches=patches):
        return forward_from([a.layer for a in target.heads])


_STACKABLE = ("head", "layer", "block", "all", "random")  # head-set targets; zero and mean ablation stack


def _stack_plan(registry: HeadRegistry, targets: Sequence[Target], methods: Sequence[str], batch: int,
                stack_rows: int) -> list[tuple[str, list[tuple[int, Target]]]]:
    """Chunks of (target index, target) that run stacked in one forward, per method: head-set targets under zero
    or mean ablation, ordered by the first layer they touch (so a chunk restarts where its members do), at most
    ``stack_rows // batch`` variants a chunk (a chunk of one runs as before)."""
    per = max(1, stack_rows // max(1, batch))
    if per == 1:
        return []
    order = {info.layer: i for i, info in enumerate(registry.layers)}
    chunks = []
    for method in (m for m in methods if m in ("zero", "mean")):
        jobs = sorted(((k, tg) for k, tg in enumerate(targets) if tg.level in _STACKABLE and tg.heads),
                      key=lambda job: (min(order[a.layer] for a in job[1].heads), job[0]))
        chunks += [(method, jobs[i:i + per]) for i in range(0, len(jobs), per) if len(jobs[i:i + per]) > 1]
    return chunks


def _tile(obj, copies: int, batch: int):
    """``obj`` (tensors, arrays, and dicts, lists, tuples and dataclasses of them) with every batch-sized tensor or
    array repeated ``copies`` times along its first axis: row r of the result is row r mod ``batch`` of the original."""
    if isinstance(obj, torch.Tensor):
        return obj.repeat(copies, *([1] * (obj.ndim - 1))) if obj.ndim and obj.shape[0] == batch else obj
    if isinstance(obj, np.ndarray):
        return np.tile(obj, (copies, *([1] * (obj.ndim - 1)))) if obj.ndim and obj.shape[0] == batch else obj
    if isinstance(obj, dict):
        return {k: _tile(v, copies, batch) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_tile(v, copies, batch) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: _tile(getattr(obj, f.name), copies, batch)
                                           for f in dataclasses.fields(obj)})
    return obj


class _TiledForward:
    """One batch's forward for ``copies`` stacked variants: the images repeated (each copy with the images' own
    captions), restarted with prefix reuse from the clean run's record, tiled once per number of copies."""

    def __init__(self, den, stages, record: dict, x_t, t, dataset: str, idx: np.ndarray, reuse: bool):
        self.den, self.stages, self.record, self.x_t, self.t = den, stages, record, x_t, t
        self.dataset, self.idx, self.reuse, self.batch = dataset, idx, reuse, len(idx)
        self._records: dict[int, dict] = {}

    def __call__(self, copies: int, touched: list[str]) -> torch.Tensor:
        if not self.reuse:
            return self.den.predict(_tile(self.x_t, copies, self.batch), _tile(self.t, copies, self.batch),
                                    rows=(self.dataset, np.tile(self.idx, copies)))
        if copies not in self._records:
            self._records[copies] = _tile(self.record, copies, self.batch)
        return self.stages.resume(touched, self._records[copies])


def _stacked_predictions(forward: _TiledForward, registry: HeadRegistry, chunk: list[tuple[int, Target]],
                         method: str, ref: ActivationMoments) -> dict[tuple[int, str], torch.Tensor]:
    """Raw predictions ``{(target index, method): [batch, ...]}`` of a chunk's variants, from one forward whose
    rows are the variants' copies of the batch; per touched layer a mask ``[rows, heads]`` says which heads each
    row ablates (to 0, or to the reference mean of that head's output)."""
    batch, rows = forward.batch, forward.batch * len(chunk)
    masks: dict[str, torch.Tensor] = {}
    for v, (_, target) in enumerate(chunk):
        for a in target.heads:
            mask = masks.setdefault(a.layer, torch.zeros(rows, registry.layer(a.layer).heads, dtype=torch.bool))
            mask[v * batch:(v + 1) * batch, a.head] = True
    hooks = {layer: rows_where(mask, 0.0 if method == "zero" else ref.mean(layer)) for layer, mask in masks.items()}
    with instrument(forward.den, registry=registry, hooks=hooks):
        out = forward(len(chunk), list(masks))  # [variants x batch, ...]
    return {(k, method): out[v * batch:(v + 1) * batch] for v, (k, _) in enumerate(chunk)}


def _batch_rows(den, registry, batch, targets, methods, ref, partner, stages, resnets, *, seed: int,
                prefix_reuse: bool, stack_rows: int) -> list[pd.DataFrame]:
    """One batch's rows: its clean prediction (recording the prefix state), then every target x method,
    stacked where they stack, one (partial) forward each otherwise."""
    acp, x_t, t, idx = den.alphas_cumprod, batch.x_t, batch.t, batch.rows
    reuse = prefix_reuse and stages.supported
    record: dict = {}
    clean = stages.run(x_t, t, rows=batch.which, record=record) if prefix_reuse else den.predict(x_t, t, rows=batch.which)

    def forward_from(names):
        return stages.resume(names, record) if reuse else den.predict(x_t, t, rows=batch.which)

    clean = den.eps_hat(clean, x_t, t)
    mse_clean = eps_mse_per_image(clean, batch.eps)
    x0_clean = x0_mse_per_image(implied_x0(x_t, clean, t, acp), batch.x0)
    tiled = _TiledForward(den, stages, record, x_t, t, batch.dataset, idx, reuse)
    preds = {}
    for method, chunk in _stack_plan(registry, targets, methods, len(idx), stack_rows):
        preds |= _stacked_predictions(tiled, registry, chunk, method, ref)
    out = []
    for k, target in enumerate(targets):
        for method in methods:
            def draw(shape, _name=target.name):  # keyed by the target's identity, not its position
                return batch_noise(shape, seed=seed, dataset=f"{batch.dataset}/noise/{_name}", images=idx,
                                   timestep=batch.timestep)
            pred = preds.get((k, method))
            if pred is None:
                pred = _intervened(den, registry, target, method, ref, partner, draw, dict(resnets), forward_from)
            pred = den.eps_hat(pred, x_t, t)
            mse = eps_mse_per_image(pred, batch.eps)
            out.append(pd.DataFrame({
                "dataset": batch.dataset, "timestep": batch.timestep, "image": idx, "level": target.level,
                "target": target.name, "n_heads": len(target.heads), "layer": target.layer, "head": target.head,
                "method": "reweight" if target.weight else method,
                "mse_clean": mse_clean.cpu().double().numpy(), "mse_intervened": mse.cpu().double().numpy(),
                "degradation_pct": (100 * (mse - mse_clean) / mse_clean).cpu().double().numpy(),
                "x0_mse_clean": x0_clean.cpu().double().numpy(),
                "x0_mse_intervened": x0_mse_per_image(implied_x0(x_t, pred, t, acp), batch.x0).cpu().double().numpy(),
            }))
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
    stack_rows: int = 64,
) -> pd.DataFrame:
    """One row per target x method x timestep x image: clean and intervened ε- and x₀-MSE.

    Head-set targets (heads, layers, blocks, all heads, random sets) under zero and mean ablation run stacked:
    up to ``stack_rows // batch`` variants share one forward, each on its own copy of the batch (per-row head
    masks), equal to one forward per variant (tested to 1e-5); ``stack_rows`` below twice the batch turns it off.

    ``reference``: the images whose mean (and SD) ``mean`` and ``noise`` ablation use; None: ``images``
    themselves (rows 0..n-1 of ``dataset``, in-sample). With ``prefix_reuse`` (UNet2DModel), each intervened forward restarts from the first block the
    intervention touches, from the clean run's recorded state; results equal the full forward's.
    """
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"unknown ablation methods {bad}; choose from {METHODS}")
    x_all = torch.from_numpy(np.asarray(images, dtype=np.float32))
    n = len(x_all)
    registry = registry or probe_registry(denoiser, x_all[:1])
    resnets = [(name, m) for name, m in resnet_blocks(denoiser.network) if any(t.name == name for t in targets)]
    stages = prefix_runner(denoiser)
    if reference is None:
        reference = [ReferenceImages(dataset=dataset, images=x_all.numpy(), index=np.arange(n))]
    rows = []
    for t_val in timesteps:
        ref = ActivationMoments()
        if {"mean", "noise"} & set(methods):
            ref = reference_moments(denoiser, registry, reference, t_val, seed=seed, batch_size=batch_size,
                                    resnets=resnets)
        for idx in batch_rows(n, batch_size):
            batch = noisy_batch(denoiser, x_all[idx], idx, t_val, seed=seed, dataset=dataset)
            partner = {}
            if "resample" in methods:  # image i takes image i+1's activation (its own caption, if any)
                other = noisy_batch(denoiser, x_all[(idx + 1) % n], (idx + 1) % n, t_val, seed=seed, dataset=dataset)
                partner = clean_activations(denoiser, registry, other.x_t, batch.t, resnets, rows=other.which)[1]
            rows += _batch_rows(denoiser, registry, batch, targets, methods, ref, partner, stages, resnets,
                                seed=seed, prefix_reuse=prefix_reuse, stack_rows=stack_rows)
            if progress is not None:
                progress(len(idx))
    frame = pd.concat(rows, ignore_index=True)
    frame["head"] = frame["head"].astype("Int64")
    frame["x0_psnr_clean"] = x0_psnr(frame.x0_mse_clean)
    frame["x0_psnr_intervened"] = x0_psnr(frame.x0_mse_intervened)
    return frame
