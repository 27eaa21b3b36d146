from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from skimage.metrics import structural_similarity

from diffcircuit import Denoiser, probe_registry
from diffcircuit.interventions.ablation import targets
from diffcircuit.interventions.sampling import sample_images, sampling_effect


@pytest.fixture
def den(small_unet):
    return Denoiser(network=small_unet, scheduler=DDPMScheduler(), model_path=".", source="t")


def _layer(den):
    registry = probe_registry(den, torch.zeros(1, 3, 16, 16), torch.zeros(1, dtype=torch.long))
    return targets(registry, "layer")[2]


def test_sampling_is_seeded_and_an_empty_window_changes_nothing(den):
    a = sample_images(den, n=2, steps=5, seed=3)
    assert torch.equal(a, sample_images(den, n=2, steps=5, seed=3))
    target = _layer(den)
    untouched = sample_images(
        den, n=2, steps=5, seed=3, target=target, window=(2000, 3000)
    )  # no step inside
    assert torch.equal(a, untouched)
    touched = sample_images(den, n=2, steps=5, seed=3, target=target)
    assert not torch.equal(a, touched)


def test_window_limits_where_the_intervention_acts(den):
    target = _layer(den)
    late = sampling_effect(den, target, n=2, steps=5, seed=1, window=(0, 300))
    every = sampling_effect(den, target, n=2, steps=5, seed=1)
    assert (every.pixel_mse > 0).all() and (late.pixel_mse > 0).all()
    assert not np.allclose(late.pixel_mse, every.pixel_mse)
    # SSIM is skimage's with Wang et al.'s settings, recomputed here
    clean = sample_images(den, n=2, steps=5, seed=1)
    ablated = sample_images(den, n=2, steps=5, seed=1, target=target)
    a, b = (
        ((clean[0].numpy() + 1) / 2).transpose(1, 2, 0),
        ((ablated[0].numpy() + 1) / 2).transpose(1, 2, 0),
    )
    expected = structural_similarity(
        a,
        b,
        channel_axis=-1,
        data_range=1.0,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
    )
    assert every.ssim.iloc[0] == pytest.approx(expected)


def _head(den, index=1):
    registry = probe_registry(den, torch.zeros(1, 3, 16, 16), torch.zeros(1, dtype=torch.long))
    return targets(registry, "head")[index]


def test_scaling_by_zero_is_zero_ablation_and_by_one_changes_nothing(den):
    from diffcircuit.interventions.sampling import controlled_samples

    target = _head(den, 3)
    clean, zeroed = controlled_samples(den, target, n=2, steps=4, seed=2)
    _, scaled0 = controlled_samples(den, target, n=2, steps=4, seed=2, method="scale", scale=0.0)
    _, scaled1 = controlled_samples(den, target, n=2, steps=4, seed=2, method="scale", scale=1.0)
    torch.testing.assert_close(scaled0, zeroed, atol=1e-6, rtol=0)
    torch.testing.assert_close(scaled1, clean, atol=1e-6, rtol=0)
    _, amplified = controlled_samples(den, target, n=2, steps=4, seed=2, method="scale", scale=3.0)
    assert not torch.allclose(amplified, clean)


def test_mean_ablation_while_sampling_matches_hooks_on_the_untouched_output_projection(den):
    """Independent: record to_out's input on the clean run, then overwrite the head's columns by their mean."""
    from diffusers import DDIMScheduler

    from diffcircuit.instrument.registry import attention_modules
    from diffcircuit.interventions.sampling import controlled_samples

    target = _head(den, 3)
    (address,) = target.heads
    attn = dict(attention_modules(den.network))[address.layer]
    d = attn.inner_dim // attn.heads
    cols = slice(address.head * d, (address.head + 1) * d)

    def run(hook):
        scheduler = DDIMScheduler.from_config(den.scheduler.config)
        scheduler.set_timesteps(4)
        x = torch.randn((2, 3, 16, 16), generator=torch.Generator().manual_seed(5))
        for i, t in enumerate(scheduler.timesteps):
            handle = attn.to_out[0].register_forward_pre_hook(lambda m, args, i=i: hook(i, args))
            with torch.no_grad():
                out = den.network(x, t.expand(2)).sample
            handle.remove()
            x = scheduler.step(out, t, x).prev_sample
        return x.clamp(-1, 1)

    means = {}

    def record(i, args):
        means[i] = args[0][..., cols].mean(0)  # [q_pos, d]

    def replace(i, args):
        h = args[0].clone()
        h[..., cols] = means[i]
        return (h,)

    clean_ref = run(record)
    ablated_ref = run(replace)
    clean, ablated = controlled_samples(den, target, n=2, steps=4, seed=5, method="mean")
    torch.testing.assert_close(clean, clean_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(ablated, ablated_ref, atol=1e-5, rtol=0)
    assert not torch.allclose(ablated, clean)


def test_guided_sampling_of_a_dit_equals_a_plain_ddim_loop_with_classifier_free_guidance(
    dit_folder,
):
    """Reference: diffusers' DDIM with explicit class labels, out = out_null + g·(out_class − out_null)."""
    from diffusers import DDIMScheduler, DiTTransformer2DModel

    from diffcircuit.interventions.sampling import sample_images
    from diffcircuit.models.loading import load_conditioned, unconditional_input

    den = load_conditioned(str(dit_folder), class_label=3)
    samples = sample_images(
        den, n=2, steps=4, seed=5, guidance=3.0, unconditional=unconditional_input(den)
    )
    raw = DiTTransformer2DModel.from_pretrained(dit_folder / "transformer").eval()
    scheduler = DDIMScheduler.from_config(den.scheduler.config)
    scheduler.set_timesteps(4)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = {
                y: raw(x, timestep=t.expand(2), class_labels=torch.tensor([y, y])).sample[:, :3]
                for y in (3, 10)
            }
            x = scheduler.step(out[10] + 3.0 * (out[3] - out[10]), t, x).prev_sample
    torch.testing.assert_close(samples, x.clamp(-1, 1), atol=1e-5, rtol=0)
    plain = sample_images(den, n=2, steps=4, seed=5)
    assert (plain - samples).abs().max() > 1e-3  # guidance changed the samples
