from __future__ import annotations

import numpy as np
import torch
from diffusers import DDPMScheduler

from diffcircuit import Denoiser, probe_registry
from diffcircuit.data.synthetic import synthetic_images
from diffcircuit.interventions.ablation import targets
from diffcircuit.interventions.patching import activation_patching


def _setup(unet):
    den = Denoiser(network=unet, scheduler=DDPMScheduler(), model_path=".", source="t")
    a = synthetic_images(3, size=16, seed=1)[0]
    b = synthetic_images(3, size=16, seed=2)[0]
    registry = probe_registry(unet, torch.from_numpy(a[:1]), torch.zeros(1, dtype=torch.long))
    every = (
        targets(registry, "head")[:4]
        + targets(registry, "layer")
        + targets(registry, "resnet", unet)[:2]
    )
    return den, a, b, registry, every


def test_patching_an_image_into_itself_changes_nothing(small_unet):
    den, a, _, registry, every = _setup(small_unet)
    rows = activation_patching(den, a, a, targets=every, timesteps=[300], registry=registry)
    assert rows.delta_mse.max() < 1e-12


def test_moved_fraction_matches_a_direct_computation(small_unet):
    from diffcircuit import instrument
    from diffcircuit.models.noise import image_noise

    den, a, b, registry, every = _setup(small_unet)
    target = every[1]  # one head
    rows = activation_patching(
        den, a, b, targets=[target], timesteps=[300], registry=registry
    ).sort_values("pair")
    eps = torch.stack(
        [image_noise((3, 16, 16), seed=0, dataset="pair", image=i, timestep=300) for i in range(3)]
    )
    t = torch.full((3,), 300)
    x_a = den.scheduler.add_noise(torch.from_numpy(a), eps, t)
    x_b = den.scheduler.add_noise(torch.from_numpy(b), eps, t)
    with torch.no_grad():
        with instrument(small_unet, cache_heads=[target.layer]) as session:
            p_a = small_unet(x_a, t).sample
        source = session.pop("head_out")[target.layer][:, target.head]
        p_b = small_unet(x_b, t).sample
        with instrument(small_unet, patches={target.name: source}):
            p = small_unet(x_b, t).sample
    toward, moved = (p_a - p_b).flatten(1), (p - p_b).flatten(1)
    expected = ((moved * toward).sum(1) / toward.pow(2).sum(1)).numpy()
    # float32 forwards: the projection of a tiny move carries ~1e-6 of summation-order noise (thread count)
    np.testing.assert_allclose(rows.moved_frac.to_numpy(), expected, rtol=1e-4, atol=2e-6)
    np.testing.assert_allclose(rows.delta_mse.to_numpy(), moved.pow(2).mean(1).numpy(), rtol=1e-4)
    assert rows.delta_mse.max() > 0


def test_stacked_patches_equal_one_forward_per_target(small_unet):
    """Head and layer patches stacked as copies of the batch (prefix reuse on) equal one forward per target."""
    den, a, b, registry, every = _setup(small_unet)
    every = every + targets(registry, "head")[4:]
    stacked = activation_patching(
        den, a, b, targets=every, timesteps=[300, 800], registry=registry, stack_rows=12
    )
    single = activation_patching(
        den, a, b, targets=every, timesteps=[300, 800], registry=registry, stack_rows=1
    )
    assert len(stacked) == len(single) == 2 * 3 * len(every)
    np.testing.assert_allclose(
        stacked.delta_mse, single.delta_mse, rtol=1e-4, atol=1e-9
    )  # a squared difference: float noise
    # the projection of a tiny move on a small p_a − p_b: float32 summation-order noise of a few 1e-6
    np.testing.assert_allclose(stacked.moved_frac, single.moved_frac, rtol=1e-4, atol=1e-5)
