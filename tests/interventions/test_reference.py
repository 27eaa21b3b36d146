"""Mean ablation with a reference disjoint from the evaluated images, against plain-PyTorch hooks."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import DDPMScheduler

from diffcircuit import Denoiser, probe_registry
from diffcircuit.data.synthetic import synthetic_images
from diffcircuit.discovery.circuits import CircuitLoss
from diffcircuit.instrument.registry import attention_modules
from diffcircuit.interventions.ablation import targets
from diffcircuit.interventions.attribution import attribution_scores
from diffcircuit.interventions.sweep import ReferenceImages, ablation_sweep
from diffcircuit.models.noise import image_noise

LAYER, HEAD, T = "up_blocks.0.attentions.1", 2, 400


def _den(unet, tmp_path):
    return Denoiser(
        network=unet,
        scheduler=DDPMScheduler(num_train_timesteps=1000),
        model_path=tmp_path,
        source="t",
    )


def _noisy(den, images, rows, dataset):
    """x_t of ``images`` (rows ``rows`` of ``dataset``) with their noise draws, the noise and t."""
    eps = torch.stack(
        [image_noise((3, 16, 16), seed=0, dataset=dataset, image=int(i), timestep=T) for i in rows]
    )
    t = torch.full((len(rows),), T)
    return den.scheduler.add_noise(torch.from_numpy(images), eps, t), eps, t


def _to_out(unet):
    attn = dict(attention_modules(unet))[LAYER]
    return attn.to_out[0], attn.to_out[0].in_features // attn.heads


def _head_mean(unet, x_t, t) -> torch.Tensor:
    """The head's output slice (to_out's input), averaged over the images: [q_pos, d]."""
    to_out, d = _to_out(unet)
    seen = {}
    handle = to_out.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0].clone()))
    with torch.no_grad():
        unet(x_t, t)
    handle.remove()
    return seen["x"][..., HEAD * d : (HEAD + 1) * d].mean(0)


def _ablated_mse(unet, x_t, t, eps, mean_slice) -> np.ndarray:
    to_out, d = _to_out(unet)

    def replace(module, args):
        x = args[0].clone()
        x[..., HEAD * d : (HEAD + 1) * d] = mean_slice
        return (x,)

    handle = to_out.register_forward_pre_hook(replace)
    with torch.no_grad():
        pred = unet(x_t, t).sample
    handle.remove()
    return ((pred - eps) ** 2).flatten(1).mean(1).numpy()


def _data(unet):
    images = synthetic_images(6, size=16, seed=0)[0]
    registry = probe_registry(unet, torch.from_numpy(images[:1]), torch.zeros(1, dtype=torch.long))
    held_out = ReferenceImages(dataset="a", images=images[3:], index=np.arange(3, 6))
    return images[:3], held_out, registry


def test_mean_ablation_with_a_held_out_reference_equals_the_hand_computed_mean(
    small_unet, tmp_path
):
    evaluated, held_out, registry = _data(small_unet)
    den = _den(small_unet, tmp_path)
    target = [t for t in targets(registry, "head") if t.name == f"{LAYER}:{HEAD}"]
    rows = ablation_sweep(
        den,
        evaluated,
        targets=target,
        methods=["mean"],
        timesteps=[T],
        registry=registry,
        batch_size=2,
        reference=[held_out],
    ).sort_values("image")
    mean_slice = _head_mean(small_unet, *_noisy(den, held_out.images, held_out.index, "a")[::2])
    x_t, eps, t = _noisy(den, evaluated, range(3), "a")
    np.testing.assert_allclose(
        rows.mse_intervened.to_numpy(), _ablated_mse(small_unet, x_t, t, eps, mean_slice), rtol=1e-4
    )
    # and it is not the in-sample mean's result
    insample = _ablated_mse(small_unet, x_t, t, eps, _head_mean(small_unet, x_t, t))
    assert np.abs(rows.mse_intervened.to_numpy() - insample).max() > 1e-6


def test_a_pooled_reference_averages_over_both_datasets_images(small_unet, tmp_path):
    evaluated, held_out, registry = _data(small_unet)
    den = _den(small_unet, tmp_path)
    other = ReferenceImages(
        dataset="b", images=synthetic_images(2, size=16, seed=9)[0], index=np.arange(4, 6)
    )
    target = [t for t in targets(registry, "head") if t.name == f"{LAYER}:{HEAD}"]
    rows = ablation_sweep(
        den,
        evaluated,
        targets=target,
        methods=["mean"],
        timesteps=[T],
        registry=registry,
        reference=[held_out, other],
    ).sort_values("image")
    x_a, _, t_a = _noisy(den, held_out.images, held_out.index, "a")
    x_b, _, t_b = _noisy(den, other.images, other.index, "b")
    pooled = _head_mean(
        small_unet, torch.cat([x_a, x_b]), torch.cat([t_a, t_b])
    )  # mean over all 5 images
    x_t, eps, t = _noisy(den, evaluated, range(3), "a")
    np.testing.assert_allclose(
        rows.mse_intervened.to_numpy(), _ablated_mse(small_unet, x_t, t, eps, pooled), rtol=1e-4
    )


def test_circuit_loss_takes_its_means_from_the_reference(small_unet, tmp_path):
    evaluated, held_out, registry = _data(small_unet)
    den = _den(small_unet, tmp_path)
    loss = CircuitLoss(den, evaluated, timesteps=[T], registry=registry, reference=[held_out])
    mean_slice = _head_mean(small_unet, *_noisy(den, held_out.images, held_out.index, "a")[::2])
    x_t, eps, t = _noisy(den, evaluated, range(3), "a")
    expected = _ablated_mse(small_unet, x_t, t, eps, mean_slice).mean()
    assert abs(loss([registry.parse(f"{LAYER}:{HEAD}")]) - expected) < 1e-5 * expected


def test_mean_attribution_scores_use_the_reference_mean(small_unet, tmp_path):
    """First order: ΔL_i ≈ (ā − a_i)·∂L_i/∂a_i, with ā the reference mean, from a hook on to_out's input."""
    evaluated, held_out, registry = _data(small_unet)
    den = _den(small_unet, tmp_path)
    table = attribution_scores(
        den, evaluated, timesteps=[T], method="mean", registry=registry, reference=[held_out]
    )
    mine = table[(table.layer == LAYER) & (table["head"] == HEAD)].sort_values("image")
    mean_slice = _head_mean(small_unet, *_noisy(den, held_out.images, held_out.index, "a")[::2])
    x_t, eps, t = _noisy(den, evaluated, range(3), "a")
    to_out, d = _to_out(small_unet)
    leaf = {}

    def capture(
        module, args
    ):  # the layer's head outputs as a leaf: ∂L/∂(head outputs), through every later layer
        leaf["x"] = args[0].detach().requires_grad_(True)
        return (leaf["x"],)

    handle = to_out.register_forward_pre_hook(capture)
    with torch.enable_grad():
        out = small_unet(x_t, t).sample
        per_image = ((out - eps) ** 2).flatten(1).mean(1)
        grad = torch.autograd.grad(per_image.sum(), leaf["x"])[0]
    handle.remove()
    a = leaf["x"].detach()[..., HEAD * d : (HEAD + 1) * d]
    g = grad[..., HEAD * d : (HEAD + 1) * d]
    expected = 100 * ((mean_slice - a) * g).flatten(1).sum(1) / per_image.detach()
    np.testing.assert_allclose(
        mine.degradation_pct.to_numpy(), expected.numpy(), rtol=1e-3, atol=1e-6
    )
