"""Flow-matching (SD3-style) denoisers read as the ε-predicting DDPM they equal (``models.flow``).

Checked against diffusers' own ``FlowMatchEulerDiscreteScheduler`` σ grid and against the raw velocity network
called with the flow's own inputs, x_σ = (1−σ)·x₀ + σ·ε and timestep σ·N.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from diffcircuit import DiffcircuitError, load_denoiser
from diffcircuit.models.conditioning import Conditioning
from diffcircuit.models.diffusion import add_noise, implied_x0
from diffcircuit.models.flow import flow_sigmas


def test_the_sigma_grid_is_the_schedulers_own():
    from diffusers import FlowMatchEulerDiscreteScheduler

    for shift in (1.0, 3.0):
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
        torch.testing.assert_close(
            flow_sigmas(dict(sched.config)).float(), sched.sigmas.flip(0), atol=1e-6, rtol=0
        )


def test_the_wrapped_flow_model_is_an_eps_predictor_on_the_equivalent_ddpm_process(sd3_folder):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    den = load_denoiser(str(sd3_folder))
    raw = SD3Transformer2DModel.from_pretrained(sd3_folder / "transformer").eval()  # no hooks
    sigmas = (
        FlowMatchEulerDiscreteScheduler.from_pretrained(sd3_folder / "scheduler")
        .sigmas.flip(0)
        .double()
    )
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.rand(3, 3, 8, 8, generator=g) * 2 - 1, torch.randn(3, 3, 8, 8, generator=g)
    t = torch.tensor([0, 400, 950])
    kw = dict(
        encoder_hidden_states=torch.randn(3, 4, 16, generator=g),
        pooled_projections=torch.randn(3, 8, generator=g),
    )
    sigma = sigmas[t].view(-1, 1, 1, 1)
    x_flow = ((1 - sigma) * x0 + sigma * eps).float()
    x_t = add_noise(x0, eps, t, den.alphas_cumprod)  # the DDPM view of the same noisy image
    scale = ((1 - sigma) ** 2 + sigma**2).sqrt().float()
    torch.testing.assert_close(x_t * scale, x_flow, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        v = raw(x_flow, timestep=(sigma.flatten() * 1000).float(), **kw).sample
        eps_hat = replace(den, conditioning=Conditioning(kw, "test")).predict_eps(x_t, t)
    torch.testing.assert_close(eps_hat, x_flow + (1 - sigma.float()) * v, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(
        implied_x0(x_t, eps_hat, t, den.alphas_cumprod),
        x_flow - sigma.float() * v,
        atol=1e-4,
        rtol=1e-4,
    )  # x̂₀ as the flow defines it


def test_pure_noise_timesteps_and_schedulers_without_a_noise_schedule_are_refused(
    sd3_folder, tmp_path
):
    den = load_denoiser(str(sd3_folder))
    den.check_timesteps([0, 998])
    with pytest.raises(DiffcircuitError, match="pure noise"):
        den.check_timesteps([999])
    with pytest.raises(DiffcircuitError, match="outside"):
        den.check_timesteps([1000])
    from diffcircuit.interventions.sampling import sample_images

    with pytest.raises(
        DiffcircuitError, match="pure noise"
    ):  # 1,000 DDIM steps would start at σ = 1
        sample_images(den, n=1, steps=1000)
    import shutil

    other = tmp_path / "edm"
    shutil.copytree(sd3_folder, other)
    (other / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({"_class_name": "EDMEulerScheduler", "sigma_min": 0.002})
    )
    with pytest.raises(DiffcircuitError, match="no DDPM noise schedule"):
        load_denoiser(str(other))
    config = json.loads((sd3_folder / "scheduler" / "scheduler_config.json").read_text())
    (other / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(config | {"use_dynamic_shifting": True})
    )
    with pytest.raises(DiffcircuitError, match="use_dynamic_shifting"):
        load_denoiser(str(other))


def test_a_flux_model_is_read_as_flux_pipeline_feeds_it(flux_folder):
    """Reference: FluxPipeline's own packing, position ids, resolution shift (calculate_shift + the scheduler's
    set_timesteps(mu=...)), timestep σ and guidance 3.5, on the raw network."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    den = load_denoiser(str(flux_folder))
    assert (den.sample_size, den.in_channels, den.image_size) == (16, 4, 32)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(flux_folder / "scheduler")
    mu = calculate_shift(
        64,
        scheduler.config.base_image_seq_len,
        scheduler.config.max_image_seq_len,
        scheduler.config.base_shift,
        scheduler.config.max_shift,
    )  # 8x8 packed tokens
    scheduler.set_timesteps(1000, mu=mu)
    sigmas = scheduler.sigmas[:-1].flip(0).double()  # ascending, without the final 0
    raw = FluxTransformer2DModel.from_pretrained(flux_folder / "transformer").eval()
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([100, 700])
    text = dict(
        encoder_hidden_states=torch.randn(2, 5, 16, generator=g),
        pooled_projections=torch.randn(2, 8, generator=g),
    )
    sigma = sigmas[t].view(-1, 1, 1, 1)
    x_flow = ((1 - sigma) * x0 + sigma * eps).float()
    x_t = add_noise(x0, eps, t, den.alphas_cumprod)
    with torch.no_grad():
        v = raw(
            FluxPipeline._pack_latents(x_flow, 2, 4, 16, 16),
            timestep=sigma.flatten().float(),
            img_ids=FluxPipeline._prepare_latent_image_ids(2, 8, 8, "cpu", torch.float32),
            txt_ids=torch.zeros(5, 3),
            guidance=torch.full((2,), 3.5),
            **text,
        ).sample
        v = FluxPipeline._unpack_latents(
            v, 16 * 8, 16 * 8, 8
        )  # as the pipeline calls it: pixels and the VAE's 8
        eps_hat = replace(den, conditioning=Conditioning(text, "test")).predict_eps(x_t, t)
    torch.testing.assert_close(eps_hat, x_flow + (1 - sigma.float()) * v, atol=1e-4, rtol=1e-4)


def test_flux_prompts_are_encoded_by_its_pipelines_t5_and_clip(flux_text_folder):
    """Reference: the T5 encoder's last hidden state (the tokens) and CLIP's pooled output, called directly."""
    import transformers

    from diffcircuit.models.loading import load_conditioned, unconditional_input

    den = load_conditioned(str(flux_text_folder), prompt="ab c")
    cond = den.conditioning
    t5 = transformers.AutoTokenizer.from_pretrained(flux_text_folder / "tokenizer_2")
    clip = transformers.AutoTokenizer.from_pretrained(flux_text_folder / "tokenizer")
    with torch.no_grad():
        tokens = transformers.T5EncoderModel.from_pretrained(flux_text_folder / "text_encoder_2")(
            t5("ab c", padding="max_length", max_length=6, return_tensors="pt").input_ids
        )[0]
        pooled = transformers.CLIPTextModel.from_pretrained(flux_text_folder / "text_encoder")(
            clip("ab c", padding="max_length", max_length=8, return_tensors="pt").input_ids
        ).pooler_output
    torch.testing.assert_close(cond.kwargs["encoder_hidden_states"], tokens, atol=1e-5, rtol=0)
    torch.testing.assert_close(cond.kwargs["pooled_projections"], pooled, atol=1e-5, rtol=0)
    assert (
        cond.tokens == ("\u2581", "a", "b", "\u2581", "c", "</s>")
        and cond.description == "prompt 'ab c'"
    )
    assert (
        unconditional_input(den).description == "the empty prompt (unconditional)"
    )  # guidance's other branch
