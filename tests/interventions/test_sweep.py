"""The ablation sweep (``interventions.sweep``) against independent implementations (weights and hooks on the
untouched modules)."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch
from diffusers import DDPMScheduler

from diffcircuit import Denoiser, instrument, probe_registry
from diffcircuit.data.synthetic import synthetic_images
from diffcircuit.instrument.registry import attention_modules
from diffcircuit.interventions import ablation_sweep, targets


def _den(unet, tmp_path):
    return Denoiser(
        network=unet,
        scheduler=DDPMScheduler(num_train_timesteps=1000),
        model_path=tmp_path,
        source="t",
    )


def _setup(unet, n=4):
    images = synthetic_images(n, size=16, seed=0)[0]
    registry = probe_registry(unet, torch.from_numpy(images[:1]), torch.zeros(1, dtype=torch.long))
    return images, registry


def _sweep(den, images, registry, target_list, methods, **kw):
    return ablation_sweep(
        den, images, targets=target_list, methods=methods, timesteps=[400], registry=registry, **kw
    )


def test_zero_ablating_a_head_with_zero_output_columns_changes_nothing(small_unet, tmp_path):
    layer, head = "mid_block.attentions.0", 1
    attn = dict(attention_modules(small_unet))[layer]
    d = attn.inner_dim // attn.heads
    with torch.no_grad():
        attn.to_out[0].weight[:, head * d : (head + 1) * d] = 0
    images, registry = _setup(small_unet)
    target = [t for t in targets(registry, "head") if t.name == f"{layer}:{head}"]
    rows = _sweep(
        _den(small_unet, tmp_path), images, registry, target, ["zero", "mean", "resample", "noise"]
    )
    np.testing.assert_allclose(rows.mse_intervened, rows.mse_clean, rtol=1e-5)


def test_zero_ablating_a_layer_equals_zeroing_its_output_projection(small_unet, tmp_path):
    images, registry = _setup(small_unet)
    layer = "down_blocks.1.attentions.0"
    rows = _sweep(
        _den(small_unet, tmp_path),
        images,
        registry,
        [t for t in targets(registry, "layer") if t.name == layer],
        ["zero"],
    )
    edited = copy.deepcopy(small_unet)
    with torch.no_grad():
        dict(attention_modules(edited))[layer].to_out[0].weight.zero_()
    # the edited model's clean error is the ablated model's error
    rows_edited = _sweep(
        _den(edited, tmp_path), images, registry, targets(registry, "head")[:1], ["zero"]
    )
    np.testing.assert_allclose(
        rows.mse_intervened.to_numpy(), rows_edited.mse_clean.to_numpy(), rtol=1e-5
    )
    assert (rows.degradation_pct.abs() > 1e-6).any()


def test_every_head_of_a_layer_equals_the_layer(small_unet, tmp_path):
    images, registry = _setup(small_unet)
    den = _den(small_unet, tmp_path)
    layer_target = targets(registry, "layer")[0]
    by_layer = _sweep(den, images, registry, [layer_target], ["mean"])
    x_t = torch.randn(2, 3, 16, 16)
    t = torch.tensor([400, 400])
    with torch.no_grad(), instrument(small_unet, zero_heads=[str(a) for a in layer_target.heads]):
        heads_out = small_unet(x_t, t).sample
    with torch.no_grad(), instrument(small_unet, patches={a: 0.0 for a in layer_target.heads}):
        patched = small_unet(x_t, t).sample
    torch.testing.assert_close(heads_out, patched)
    assert by_layer.target.unique().tolist() == [layer_target.name]


def test_mean_ablation_matches_a_hook_on_the_untouched_output_projection(small_unet, tmp_path):
    images, registry = _setup(small_unet, n=3)
    den = _den(small_unet, tmp_path)
    layer, head = "up_blocks.0.attentions.1", 2
    target = [t for t in targets(registry, "head") if t.name == f"{layer}:{head}"]
    rows = _sweep(den, images, registry, target, ["mean"], batch_size=2).sort_values("image")
    # independent: capture to_out's input on clean runs, average the head's slice, write it back by a pre-hook
    from diffcircuit.models import image_noise

    x0 = torch.from_numpy(images)
    eps = torch.stack(
        [image_noise((3, 16, 16), seed=0, dataset="a", image=i, timestep=400) for i in range(3)]
    )
    t = torch.full((3,), 400)
    x_t = den.scheduler.add_noise(x0, eps, t)
    to_out = dict(attention_modules(small_unet))[layer].to_out[0]
    d = to_out.in_features // dict(attention_modules(small_unet))[layer].heads
    seen = {}
    handle = to_out.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0].clone()))
    with torch.no_grad():
        small_unet(x_t, t)
    handle.remove()
    mean_slice = seen["x"][..., head * d : (head + 1) * d].mean(0)  # [q_pos, d]

    def replace(module, args):
        x = args[0].clone()
        x[..., head * d : (head + 1) * d] = mean_slice
        return (x,)

    handle = to_out.register_forward_pre_hook(replace)
    with torch.no_grad():
        pred = small_unet(x_t, t).sample
    handle.remove()
    expected = ((pred - eps) ** 2).flatten(1).mean(1).numpy()
    np.testing.assert_allclose(rows.mse_intervened.to_numpy(), expected, rtol=1e-4)


def test_resampling_an_image_into_itself_changes_nothing(small_unet, tmp_path):
    images, registry = _setup(small_unet, n=1)  # the partner of the only image is itself
    some = (
        targets(registry, "head")[:3]
        + targets(registry, "block")
        + targets(registry, "resnet", small_unet)[:2]
    )
    rows = _sweep(_den(small_unet, tmp_path), images, registry, some, ["resample"])
    np.testing.assert_allclose(rows.mse_intervened, rows.mse_clean, rtol=1e-5)


def test_resnet_zero_ablation_equals_zeroing_its_last_convolution(small_unet, tmp_path):
    images, registry = _setup(small_unet)
    name = "down_blocks.1.resnets.0"
    rows = _sweep(
        _den(small_unet, tmp_path),
        images,
        registry,
        [t for t in targets(registry, "resnet", small_unet) if t.name == name],
        ["zero"],
    )
    edited = copy.deepcopy(small_unet)
    conv2 = edited.get_submodule(name).conv2
    with torch.no_grad():
        conv2.weight.zero_()
        conv2.bias.zero_()
    rows_edited = _sweep(
        _den(edited, tmp_path), images, registry, targets(registry, "head")[:1], ["zero"]
    )
    np.testing.assert_allclose(
        rows.mse_intervened.to_numpy(), rows_edited.mse_clean.to_numpy(), rtol=1e-5
    )


@pytest.mark.parametrize("method", ["noise", "resample"])
def test_results_do_not_depend_on_batch_size(small_unet, tmp_path, method):
    images, registry = _setup(small_unet, n=5)
    den = _den(small_unet, tmp_path)
    some = targets(registry, "head")[:2]
    a = _sweep(den, images, registry, some, [method], batch_size=5).sort_values(["target", "image"])
    b = _sweep(den, images, registry, some, [method], batch_size=2).sort_values(["target", "image"])
    np.testing.assert_allclose(a.mse_intervened.to_numpy(), b.mse_intervened.to_numpy(), rtol=1e-5)


@pytest.mark.parametrize("method", ["zero", "mean", "resample", "noise"])
def test_prefix_reuse_equals_the_naive_loop(small_unet, tmp_path, method):
    images, registry = _setup(small_unet, n=3)
    den = _den(small_unet, tmp_path)
    every = [t for level in ("head", "layer", "block") for t in targets(registry, level)]
    every += targets(registry, "resnet", small_unet)
    fast = _sweep(den, images, registry, every, [method], prefix_reuse=True)
    slow = _sweep(den, images, registry, every, [method], prefix_reuse=False)
    np.testing.assert_allclose(
        fast.mse_intervened.to_numpy(), slow.mse_intervened.to_numpy(), rtol=1e-5, atol=1e-8
    )
    np.testing.assert_allclose(fast.mse_clean.to_numpy(), slow.mse_clean.to_numpy(), rtol=1e-6)


def test_v_prediction_sweep_scores_the_implied_eps(small_unet, tmp_path):
    # the sweep's clean error must equal observe()'s (a separate code path), and the intervened one
    # an edited model's clean error, both measured on the ε a v-prediction output implies
    from diffcircuit import observe

    v_sched = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    den = Denoiser(network=small_unet, scheduler=v_sched, model_path=tmp_path, source="t")
    images, registry = _setup(small_unet, n=3)
    layer = "mid_block.attentions.0"
    rows = _sweep(
        den,
        images,
        registry,
        [t for t in targets(registry, "layer") if t.name == layer],
        ["zero"],
        dataset="a",
    )
    _, per_image = observe(den, images, timesteps=[400], dataset="a")
    np.testing.assert_allclose(
        rows.sort_values("image").mse_clean, per_image.sort_values("image").eps_mse, rtol=1e-5
    )
    edited = copy.deepcopy(small_unet)
    with torch.no_grad():
        dict(attention_modules(edited))[layer].to_out[0].weight.zero_()
    _, per_edited = observe(
        Denoiser(network=edited, scheduler=v_sched, model_path=tmp_path, source="t"),
        images,
        timesteps=[400],
        dataset="a",
    )
    np.testing.assert_allclose(
        rows.sort_values("image").mse_intervened, per_edited.sort_values("image").eps_mse, rtol=1e-4
    )


def test_x0_psnr_columns_match_skimage(small_unet, tmp_path):
    from skimage.metrics import peak_signal_noise_ratio

    from diffcircuit.models import image_noise
    from diffcircuit.models.diffusion import implied_x0

    den = _den(small_unet, tmp_path)
    images, registry = _setup(small_unet, n=2)
    rows = _sweep(den, images, registry, targets(registry, "layer")[:1], ["zero"], dataset="a")
    row = rows[rows.image == 1].iloc[0]
    x0 = torch.from_numpy(images[1:2])
    eps = image_noise(x0.shape[1:], seed=0, dataset="a", image=1, timestep=400)[None]
    t = torch.tensor([400])
    x_t = den.scheduler.add_noise(x0, eps, t)
    with torch.no_grad():
        x0_hat = implied_x0(x_t, small_unet(x_t, t).sample, t, den.alphas_cumprod)
    expected = peak_signal_noise_ratio(
        x0.numpy().astype(np.float64), x0_hat.numpy().astype(np.float64), data_range=2.0
    )
    assert row.x0_psnr_clean == pytest.approx(expected, abs=1e-3)
    assert row.x0_psnr_intervened == pytest.approx(10 * np.log10(4 / row.x0_mse_intervened))


@pytest.mark.parametrize("family", ["sd3", "flux", "dit"])
def test_block_memo_prefix_reuse_equals_full_forwards_on_transformers(
    family, sd3_folder, flux_folder, tmp_path
):
    """Every head, layer and block ablated with blocks memoised equals the full forwards, and the first block is
    not recomputed for targets after it."""
    from diffcircuit import model_images
    from diffcircuit.interventions.prefix import BlockMemo, prefix_runner

    den = _transformer(family, sd3_folder, flux_folder, tmp_path)
    assert isinstance(prefix_runner(den), BlockMemo)
    images = model_images(den, "synthetic", n=3).images
    registry = probe_registry(den, torch.from_numpy(images[:1]))
    every = [t for level in ("head", "layer", "block") for t in targets(registry, level)]
    first = dict(attention_modules(den.network))[registry.layers[0].layer]
    calls = []
    hook = first.to_q.register_forward_hook(lambda *a: calls.append(1))
    fast = _sweep(
        den, images, registry, every, ["zero", "mean"], prefix_reuse=True, stack_rows=1
    )  # one per forward
    n_fast, calls[:] = len(calls), []
    slow = _sweep(den, images, registry, every, ["zero", "mean"], prefix_reuse=False, stack_rows=1)
    hook.remove()
    np.testing.assert_allclose(
        fast.mse_intervened.to_numpy(), slow.mse_intervened.to_numpy(), rtol=1e-5, atol=1e-8
    )
    np.testing.assert_allclose(fast.mse_clean.to_numpy(), slow.mse_clean.to_numpy(), rtol=1e-6)
    assert n_fast < len(calls)  # intervened forwards after the first block skipped it


def _transformer(family: str, sd3_folder, flux_folder, tmp_path):
    from diffusers import DiTTransformer2DModel

    from diffcircuit.models import load_conditioned

    if family == "dit":
        torch.manual_seed(0)
        DiTTransformer2DModel(
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=3,
            out_channels=6,
            num_layers=3,
            sample_size=8,
            patch_size=2,
            num_embeds_ada_norm=10,
        ).save_pretrained(tmp_path / "transformer")
        DDPMScheduler().save_pretrained(tmp_path / "scheduler")
        return load_conditioned(str(tmp_path), class_label=2)
    folder = {"sd3": sd3_folder, "flux": flux_folder}[family]
    return load_conditioned(str(folder), prompt_embeds=str(folder.parent / "embeds.safetensors"))


@pytest.mark.parametrize("family", ["unet", "unet-full-forwards", "sd3", "flux", "dit"])
def test_stacked_variants_equal_one_forward_per_variant(
    family, small_unet, sd3_folder, flux_folder, tmp_path
):
    """Heads, layers, blocks, all heads and random sets under zero and mean ablation, stacked several variants to
    a forward (prefix reuse from the tiled record, or full forwards), equal one forward per variant to 1e-5; and
    they really were stacked (fewer forwards)."""
    from diffcircuit import model_images
    from diffcircuit.instrument.cost import count_forwards
    from diffcircuit.interventions import random_head_sets

    if family.startswith("unet"):
        den = _den(small_unet, tmp_path)
        images, registry = _setup(small_unet, n=3)
    else:
        den = _transformer(family, sd3_folder, flux_folder, tmp_path)
        images = model_images(den, "synthetic", n=3).images
        registry = probe_registry(
            den, torch.from_numpy(images[:1]), torch.zeros(1, dtype=torch.long)
        )
    plan = [t for level in ("head", "layer", "block", "all") for t in targets(registry, level)]
    plan += random_head_sets(registry, 2, 3, seed=1)
    reuse = family != "unet-full-forwards"
    with count_forwards(den.network) as stacked_cost:
        stacked = _sweep(
            den, images, registry, plan, ["zero", "mean"], prefix_reuse=reuse, stack_rows=12
        )
    with count_forwards(den.network) as single_cost:
        single = _sweep(
            den, images, registry, plan, ["zero", "mean"], prefix_reuse=reuse, stack_rows=1
        )
    pd.testing.assert_frame_equal(
        stacked.drop(
            columns=["mse_intervened", "degradation_pct", "x0_mse_intervened", "x0_psnr_intervened"]
        ),
        single.drop(
            columns=["mse_intervened", "degradation_pct", "x0_mse_intervened", "x0_psnr_intervened"]
        ),
    )
    np.testing.assert_allclose(
        stacked.mse_intervened.to_numpy(), single.mse_intervened.to_numpy(), rtol=1e-5, atol=1e-8
    )
    np.testing.assert_allclose(
        stacked.x0_mse_intervened.to_numpy(),
        single.x0_mse_intervened.to_numpy(),
        rtol=1e-5,
        atol=1e-8,
    )
    assert (
        stacked_cost.forward_calls < single_cost.forward_calls / 2
    )  # 4 variants a forward (12 rows / 3 images)
