"""Interventions during full sampling, at all denoising steps or within a timestep window.

``sample_images`` draws images with DDIM from a seeded noise, optionally zero-ablating a target
while the step's timestep lies in ``window`` (inclusive bounds; ``None`` = every step).
``sampling_effect`` samples the same noise with and without the intervention and compares the
final images: pixel MSE on [-1, 1], and SSIM on [0, 1] with the settings of Wang et al. (2004)
(Gaussian window σ = 1.5, population covariance), as ``skimage.metrics.structural_similarity``
documents them.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack

import numpy as np
import pandas as pd
import torch

from diffcircuit.errors import ConfigError
from diffcircuit.instrument.session import instrument
from diffcircuit.interventions.ablation import Target, resnet_blocks, resnet_intervention
from diffcircuit.models.diffusion import model_device

__all__ = [
    "SAMPLING_METHODS",
    "controlled_samples",
    "sample_images",
    "sample_metrics",
    "sampling_effect",
]


SAMPLING_METHODS = ("zero", "mean", "scale")


def _intervention(net, target: Target, method: str, scale: float, means: dict | None):
    """The context that applies ``method`` to ``target`` for one denoising step."""
    if target.level == "resnet":
        if method != "zero":
            raise ConfigError("ResNet blocks can only be zero-ablated during sampling")
        return resnet_intervention(dict(resnet_blocks(net))[target.name], replace=torch.zeros_like)
    if target.level == "token":  # a prompt token removed (or reweighted) in every cross/joint head
        if method != "zero":
            raise ConfigError("a prompt token can only be removed or reweighted while sampling")
        return instrument(
            net, token_scales={a: {target.token: target.weight} for a in target.heads}
        )
    if method == "zero":
        return instrument(net, zero_heads=list(target.heads))
    if method == "scale":
        return instrument(net, scales={a: scale for a in target.heads})
    return instrument(net, patches={a: means[a.layer][a.head] for a in target.heads})


def _check(target: Target | None, method: str, scale: float | None) -> None:
    if method not in SAMPLING_METHODS:
        raise ConfigError(
            f"sampling intervention must be one of {SAMPLING_METHODS}, not {method!r}"
        )
    if (method == "scale") != (scale is not None):
        raise ConfigError("give a scale factor exactly when the method is 'scale'")
    if target is None and method != "zero":
        raise ConfigError("mean and scale interventions need a target")


def _guided(
    den, x, t, guidance: float, unconditional, session, step_means: dict | None, i: int
) -> torch.Tensor:
    """One step's model output: conditional (recorded by ``session``), moved by classifier-free guidance
    out_u + g·(out_c − out_u) when g ≠ 1; a learned-variance half (DiT) is dropped, as DDIM ignores it."""
    out = den.predict(x, t.expand(len(x)))[
        :, : x.shape[1]
    ]  # in the model's prediction_type; the scheduler knows it
    if session is not None:  # mean-ablation references: the conditional branch's mean head outputs
        step_means[i] = {layer: v.mean(0) for layer, v in session.pop("head_out").items()}
    if guidance == 1.0:
        return out
    plain = den.predict(x, t.expand(len(x)), conditioning=unconditional)[:, : x.shape[1]]
    return plain + guidance * (out - plain)


@torch.no_grad()
def sample_images(
    denoiser,
    *,
    n: int,
    steps: int = 50,
    seed: int = 0,
    target: Target | None = None,
    window: tuple[int, int] | None = None,
    method: str = "zero",
    scale: float | None = None,
    step_means: dict | None = None,
    record_layers: tuple[str, ...] = (),
    guidance: float = 1.0,
    unconditional=None,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """``n`` images ``[n, C, H, W]`` in [-1, 1] by DDIM (η = 0) from seeded noise.

    With a ``target``, while the step's timestep lies in ``window`` (inclusive; None = every step),
    its heads are zeroed ("zero"), multiplied by ``scale`` ("scale") or replaced by ``step_means``
    ("mean": step index -> layer -> ``[heads, q_pos, d]``, see :func:`clean_step_means`).
    ``record_layers`` stores each step's mean head outputs of those layers into ``step_means``. A conditional
    model samples with its attached conditioning; ``guidance`` g ≠ 1 adds classifier-free guidance towards it
    from ``unconditional`` (the interventions act on both branches).
    """
    from diffusers import DDIMScheduler

    _check(target, method, scale)
    net = denoiser.network
    scheduler = DDIMScheduler.from_config(denoiser.scheduler.config)
    scheduler.set_timesteps(steps)
    denoiser.check_timesteps(
        [int(t) for t in scheduler.timesteps]
    )  # a flow model's σ = 1: no x₀ to step towards
    shape = (n, denoiser.in_channels, denoiser.sample_size, denoiser.sample_size)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(model_device(net))
    for i, t in enumerate(scheduler.timesteps):
        active = target is not None and (window is None or window[0] <= int(t) <= window[1])
        with ExitStack() as stack:
            if active:
                stack.enter_context(
                    _intervention(
                        net, target, method, scale, None if step_means is None else step_means[i]
                    )
                )
            session = (
                stack.enter_context(instrument(net, cache_heads=record_layers))
                if record_layers
                else None
            )
            out = _guided(
                denoiser, x, t.to(x.device), guidance, unconditional, session, step_means, i
            )
        x = scheduler.step(out, t, x).prev_sample
        if progress is not None:
            progress(1)
    return (
        denoiser.codec.decode(x) if denoiser.codec is not None else x.clamp(-1, 1).cpu()
    )  # pixels either way


def controlled_samples(
    denoiser,
    target: Target,
    *,
    n: int = 8,
    steps: int = 50,
    seed: int = 0,
    window: tuple[int, int] | None = None,
    method: str = "zero",
    scale: float | None = None,
    guidance: float = 1.0,
    unconditional=None,
    progress: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(clean, intervened)`` samples from the same seeded noise.

    Mean ablation replaces a head's output, at each step, by its mean over the clean samples at
    that step (same position): the clean run is the reference set.
    """
    _check(target, method, scale)
    means: dict = {}
    layers = tuple(dict.fromkeys(a.layer for a in target.heads)) if method == "mean" else ()
    guide = dict(guidance=guidance, unconditional=unconditional, progress=progress)
    clean = sample_images(
        denoiser, n=n, steps=steps, seed=seed, step_means=means, record_layers=layers, **guide
    )
    changed = sample_images(
        denoiser,
        n=n,
        steps=steps,
        seed=seed,
        target=target,
        window=window,
        method=method,
        scale=scale,
        step_means=means if method == "mean" else None,
        **guide,
    )
    return clean, changed


def sample_metrics(clean: torch.Tensor, changed: torch.Tensor) -> pd.DataFrame:
    """Per sample: pixel MSE on [-1, 1] and SSIM on [0, 1] (Wang et al. settings; images under 11 pixels a side
    use the largest odd window that fits) between two batches."""
    from skimage.metrics import structural_similarity

    rows = []
    for i in range(len(clean)):
        a = ((clean[i].numpy() + 1) / 2).transpose(1, 2, 0)
        b = ((changed[i].numpy() + 1) / 2).transpose(1, 2, 0)
        side = min(
            a.shape[:2]
        )  # the 11-pixel window of Wang et al., narrowed (odd) for images smaller than that
        window = min(11, side if side % 2 else side - 1)
        ssim = (
            float("nan")
            if window < 3
            else structural_similarity(
                a,
                b,
                channel_axis=-1,
                data_range=1.0,
                gaussian_weights=True,
                sigma=1.5,
                use_sample_covariance=False,
                win_size=window,
            )
        )
        rows.append(
            {
                "sample": i,
                "pixel_mse": float(((clean[i] - changed[i]) ** 2).mean()),
                "ssim": float(ssim),
            }
        )
    return pd.DataFrame(rows).astype({"pixel_mse": np.float64, "ssim": np.float64})


def sampling_effect(
    denoiser,
    target: Target,
    *,
    n: int = 8,
    steps: int = 50,
    seed: int = 0,
    window: tuple[int, int] | None = None,
    method: str = "zero",
    scale: float | None = None,
    guidance: float = 1.0,
    unconditional=None,
    progress: Callable[[int], None] | None = None,
) -> pd.DataFrame:
    """Per sampled image: pixel MSE and SSIM between clean and intervened samples from the same noise.
    ``progress(1)`` after each sampling step (``2 * steps`` in all: clean, then intervened)."""
    clean, changed = controlled_samples(
        denoiser,
        target,
        n=n,
        steps=steps,
        seed=seed,
        window=window,
        method=method,
        scale=scale,
        guidance=guidance,
        unconditional=unconditional,
        progress=progress,
    )
    frame = sample_metrics(clean, changed)
    frame.insert(1, "target", target.name)
    frame.insert(2, "window", "all" if window is None else f"{window[0]}-{window[1]}")
    frame.insert(3, "steps", steps)
    frame.insert(
        4,
        "method",
        "reweight" if target.weight else method if scale is None else f"scale {scale:g}",
    )
    frame.insert(5, "guidance", float(guidance))
    return frame
