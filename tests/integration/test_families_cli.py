"""Issue 9 through the commands: a text-conditioned UNet pipeline folder (tiny UNet2DConditionModel, tiny
CLIP tokenizer and text encoder, random weights) and a DiT folder, loaded by the same ``from_pretrained``
path a user's Stable Diffusion, PixArt or DiT folder takes: ``info --json`` lists self and cross layers with
their query grids, ``run`` completes (the prompt's tokens are the cross-attention keys, with token maps), and
``guidance`` compares the two branches of classifier-free guidance."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from diffcircuit.cli import main

TEXT_DIM, MAX_TOKENS = 24, 8


@pytest.fixture(scope="module")
def text_pipeline(tmp_path_factory, text_unet, clip_tokenizer_writer):
    transformers = pytest.importorskip("transformers", reason="the text extra is not installed")
    from diffusers import DDPMScheduler

    root = tmp_path_factory.mktemp("sd") / "tiny-sd"
    tokenizer = clip_tokenizer_writer(root / "tokenizer", MAX_TOKENS)
    torch.manual_seed(0)
    encoder = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=TEXT_DIM,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=MAX_TOKENS,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    encoder.save_pretrained(root / "text_encoder", safe_serialization=True)
    unet = text_unet(text_dim=TEXT_DIM, in_channels=3, channels=(16, 32))
    unet.save_pretrained(root / "unet", safe_serialization=True)
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "StableDiffusionPipeline",
                "unet": ["diffusers", "UNet2DConditionModel"],
                "scheduler": ["diffusers", "DDPMScheduler"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
            }
        )
    )
    return root


def _info(capsys, *args) -> dict:
    capsys.readouterr()
    assert main(["info", "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_info_lists_self_and_cross_layers_of_a_text_conditioned_unet(text_pipeline, capsys):
    info = _info(capsys, "--model", str(text_pipeline), "--prompt", "a face")
    assert info["class"] == "UNet2DConditionModel" and info["conditioning"] == "prompt 'a face'"
    layers = {l["layer"]: l for l in info["layers"]}
    assert {l["kind"] for l in layers.values()} == {"self", "cross"}
    for name, layer in layers.items():
        assert layer["kind"] == ("cross" if name.endswith("attn2") else "self")
        side = 16 if name.startswith("down_blocks.0") or name.startswith("up_blocks.1") else 8
        assert layer["query_grid"] == [
            side,
            side,
        ]  # token sequences mapped back onto the image grid
        assert layer["n_keys"] == (MAX_TOKENS if layer["kind"] == "cross" else side * side)


def test_info_lists_a_dit_with_its_patch_grid_and_null_class(dit_folder, capsys):
    info = _info(capsys, "--model", str(dit_folder))
    assert (
        info["class"] == "DiTTransformer2DModel"
        and info["conditioning"] == "null class 10 (unconditional)"
    )
    assert [(l["kind"], l["heads"], l["query_grid"], l["n_keys"]) for l in info["layers"]] == [
        ("self", 2, [8, 8], 64)
    ] * 2


def test_info_lists_a_pixart_transformer_with_self_and_cross_layers(pixart_folder, capsys):
    info = _info(
        capsys,
        "--model",
        str(pixart_folder),
        "--prompt-embeds",
        str(pixart_folder.parent / "embeds.safetensors"),
    )
    assert [(l["kind"], l["query_grid"], l["n_keys"]) for l in info["layers"]] == [
        ("self", [8, 8], 64),
        ("cross", [8, 8], 5),
    ] * 2


def test_sd3_info_lists_joint_layers_and_run_completes_with_joint_heads_analysed(
    sd3_folder, tmp_path, capsys
):
    embeds = str(sd3_folder.parent / "embeds.safetensors")
    info = _info(capsys, "--model", str(sd3_folder), "--prompt-embeds", embeds)
    assert info["class"] == "SD3Transformer2DModel"
    assert [(l["kind"], l["heads"], l["query_grid"], l["n_keys"]) for l in info["layers"]] == [
        ("joint", 2, [4, 4], 16 + 5)
    ] * 2
    assert _run(sd3_folder, tmp_path / "run", "--prompt-embeds", embeds) == 0
    tables = tmp_path / "run" / "tables"
    heads = pd.read_parquet(tables / "head_metrics.parquet")
    assert (
        set(heads.n_keys) == {21} and heads.distance_px.notna().all()
    )  # spatial probes on the image keys
    assert heads.entropy_norm.between(0, 1).all()
    ablations = pd.read_parquet(tables / "ablations.parquet")
    assert {"head", "layer"} <= set(ablations.level)
    assert set(pd.read_parquet(tables / "token_maps.parquet").token) == set(
        range(5)
    )  # DAAM maps from joint heads
    assert len(pd.read_parquet(tables / "gallery.parquet"))


def test_sd3_guidance_takes_its_unconditional_branch_from_the_embeddings_file(
    sd3_folder, tmp_path, capsys
):
    from safetensors.torch import load_file, save_file

    from diffcircuit.models.loading import load_conditioned, unconditional_input

    given = load_file(str(sd3_folder.parent / "embeds.safetensors"))
    negative = {
        "negative_prompt_embeds": torch.randn(1, 5, 16),
        "negative_pooled_prompt_embeds": torch.randn(1, 8),
    }
    save_file(given | negative, str(tmp_path / "both.safetensors"))
    den = load_conditioned(str(sd3_folder), prompt_embeds=str(tmp_path / "both.safetensors"))
    branch = unconditional_input(den).kwargs
    assert torch.equal(branch["encoder_hidden_states"], negative["negative_prompt_embeds"])
    assert torch.equal(branch["pooled_projections"], negative["negative_pooled_prompt_embeds"])
    grid = tmp_path / "g.png"
    assert (
        main(
            [
                "generate",
                "--out",
                str(grid),
                "--model",
                str(sd3_folder),
                "--prompt-embeds",
                str(tmp_path / "both.safetensors"),
                "--guidance",
                "4",
                "--ablate",
                "transformer_blocks.0.attn:1",
                "--n",
                "2",
                "--steps",
                "3",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "generate",
                "--out",
                str(grid),
                "--model",
                str(sd3_folder),
                "--prompt-embeds",
                str(sd3_folder.parent / "embeds.safetensors"),
                "--guidance",
                "4",
                "--ablate",
                "transformer_blocks.0.attn:1",
                "--n",
                "2",
                "--steps",
                "3",
            ]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert "negative_prompt_embeds" in err and "Traceback" not in err


def test_sd3_without_prompt_embeddings_is_refused_in_one_line(sd3_folder, tmp_path, capsys):
    assert _run(sd3_folder, tmp_path / "run") != 0
    err = capsys.readouterr().err
    assert "--prompt-embeds" in err and "Traceback" not in err and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_run_on_a_latent_dit_encodes_images_with_its_vae_and_probes_the_pixels(
    tmp_path, autoencoder, transformer_folder
):
    """DiT-style folder with vae/: the network sees 4x16x16 latents of 32x32 images; probes and figures see pixels."""
    from diffusers import DiTTransformer2DModel

    from diffcircuit import model_images, observe
    from diffcircuit.models.loading import load_conditioned

    torch.manual_seed(0)
    net = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        sample_size=16,
        patch_size=2,
        num_embeds_ada_norm=10,
    )
    folder = transformer_folder(tmp_path / "latent-dit", net, "DiTPipeline")
    autoencoder("vae", 4).save_pretrained(folder / "vae", safe_serialization=True)
    assert _run(folder, tmp_path / "run") == 0
    run = tmp_path / "run"
    manifest = json.loads((run / "manifest.json").read_text())
    assert (
        manifest["model"]["latent"]["autoencoder"] == "AutoencoderKL"
        and manifest["model"]["latent"]["image_size"] == 32
    )
    pictures = pd.read_parquet(run / "tables" / "gallery_images.parquet")
    assert set(pictures["size"]) == {32} and set(pictures.channels) == {3}
    heads = pd.read_parquet(run / "tables" / "head_metrics.parquet")
    den = load_conditioned(str(folder))
    images = model_images(
        den, "synthetic", n=3, gray=True
    )  # rendered gray: the run's other set, faces, is
    direct, _ = observe(
        den, images.images, timesteps=[20], masks=images.masks, pictures=images.pixels, dataset="a"
    )
    mine = heads[(heads.dataset == "a") & (heads.timestep == 20)].sort_values(
        ["image", "layer", "head"]
    )
    direct = direct.sort_values(["image", "layer", "head"])
    for column in (
        "entropy_nats",
        "edge_affinity",
        "object_affinity",
    ):  # object masks are 32x32, pooled onto 8x8
        np.testing.assert_allclose(mine[column], direct[column], rtol=1e-5)


@pytest.mark.slow
def test_each_captioned_image_is_denoised_with_its_own_caption(
    text_pipeline, tmp_path, captioned_folder
):
    """A folder with captions.csv: image i's cross-attention keys are its caption's tokens, checked against the
    network fed that caption's embeddings (from the text encoder called directly) one image at a time."""
    import transformers

    from diffcircuit import instrument, model_images
    from diffcircuit.models.diffusion import add_noise
    from diffcircuit.models.loading import load_conditioned
    from diffcircuit.models.noise import batch_noise

    captions = {
        "0.png": "a",
        "1.png": "bcd",
        "2.png": "ee",
    }  # different lengths: a mix-up would show
    folder = captioned_folder(tmp_path / "pairs", captions)
    out = tmp_path / "run"
    assert _run(text_pipeline, out, "--data-b", str(folder), "--prompt", "z") == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert (
        manifest["datasets"]["b"]["captions"] == "each image's own caption"
        and manifest["datasets"]["a"]["captions"] is None
    )
    heads = pd.read_parquet(out / "tables" / "head_metrics.parquet")
    tokenizer = transformers.CLIPTokenizer.from_pretrained(text_pipeline / "tokenizer")
    encoder = transformers.CLIPTextModel.from_pretrained(text_pipeline / "text_encoder").eval()
    den = load_conditioned(str(text_pipeline), prompt="z")
    images = model_images(den, str(folder), n=3)
    for i, caption in enumerate(captions.values()):
        ids = tokenizer(
            caption, padding="max_length", max_length=MAX_TOKENS, return_tensors="pt"
        ).input_ids
        with torch.no_grad():
            embeds = encoder(ids)[0]
            x0 = torch.from_numpy(np.asarray(images.images[i : i + 1]))
            eps = batch_noise(x0.shape[1:], seed=0, dataset="b", images=[i], timestep=800)
            t = torch.tensor([800])
            with instrument(den.network, capture=True) as session:
                den.network(
                    add_noise(x0, eps, t, den.alphas_cumprod), t, encoder_hidden_states=embeds
                )
        entropy = session.pop("entropy_nats")
        rows = heads[(heads.dataset == "b") & (heads.image == i) & (heads.timestep == 800)]
        for layer, values in entropy.items():
            got = rows[rows.layer == layer].sort_values("head").entropy_nats.to_numpy()
            np.testing.assert_allclose(got, values[0].double().numpy(), atol=1e-5)
    # the ablation sweep's clean forwards saw the same captions as the observation (checked above)
    clean = (
        pd.read_parquet(out / "tables" / "ablations.parquet")
        .groupby(["dataset", "image", "timestep"])
        .mse_clean.first()
    )
    seen = (
        pd.read_parquet(out / "tables" / "denoising.parquet")
        .set_index(["dataset", "image", "timestep"])
        .eps_mse
    )
    np.testing.assert_allclose(clean.to_numpy(), seen.loc[clean.index].to_numpy(), rtol=1e-5)
    maps = pd.read_parquet(out / "tables" / "token_maps.parquet")
    texts = (
        maps[(maps.dataset == "b") & (maps.image == 1)]
        .drop_duplicates("token")
        .sort_values("token")
        .text.tolist()
    )
    assert texts == [
        "<|startoftext|>",
        "b",
        "c",
        "d</w>",
        "<|endoftext|>",
    ]  # image 1's caption, tokenised


def test_generate_ablate_sample_and_discover_take_conditional_models(dit_folder, tmp_path):
    grid = tmp_path / "gen" / "grid.png"
    assert (
        main(
            [
                "generate",
                "--out",
                str(grid),
                "--model",
                str(dit_folder),
                "--class-label",
                "3",
                "--guidance",
                "2",
                "--ablate",
                "transformer_blocks.0.attn1",
                "--n",
                "2",
                "--steps",
                "3",
            ]
        )
        == 0
    )
    record = json.loads(grid.with_suffix(".json").read_text())
    assert (
        record["config"]["guidance"] == 2.0
        and record["config"]["class_label"] == 3
        and len(record["samples"]) == 2
    )
    out = tmp_path / "ab"
    assert (
        main(
            [
                "ablate",
                "--out",
                str(out),
                "--model",
                str(dit_folder),
                "--class-label",
                "3",
                "--data",
                "synthetic",
                "--n",
                "2",
                "--target",
                "transformer_blocks.1.attn1",
                "--sample",
                "2",
                "--sample-steps",
                "3",
                "--guidance",
                "1.5",
                "--quiet",
            ]
        )
        == 0
    )
    sampling = pd.read_parquet(out / "tables" / "sampling.parquet")
    assert len(sampling) == 2 and set(sampling.guidance) == {1.5} and sampling.pixel_mse.gt(0).all()
    disc = tmp_path / "disc"
    assert (
        main(
            [
                "discover",
                "--out",
                str(disc),
                "--model",
                str(dit_folder),
                "--class-label",
                "3",
                "--n",
                "2",
                "--timesteps",
                "500",
                "--resamples",
                "2",
                "--data-b",
                "none",
                "--quiet",
            ]
        )
        == 0
    )
    assert json.loads((disc / "discover.json").read_text())["conditioning"] == "class 3"


@pytest.mark.slow
def test_flux_run_completes_with_its_double_and_single_stream_heads_analysed(
    flux_folder, tmp_path, capsys
):
    embeds = str(flux_folder.parent / "embeds.safetensors")
    info = _info(capsys, "--model", str(flux_folder), "--prompt-embeds", embeds)
    assert [(l["layer"], l["kind"], l["query_grid"], l["n_keys"]) for l in info["layers"]] == [
        ("transformer_blocks.0.attn", "joint", [8, 8], 64 + 5),
        ("single_transformer_blocks.0.attn", "joint", [8, 8], 69),
    ]
    assert _run(flux_folder, tmp_path / "run", "--prompt-embeds", embeds) == 0
    run = tmp_path / "run"
    heads = pd.read_parquet(run / "tables" / "head_metrics.parquet")
    assert set(heads.layer) == {"transformer_blocks.0.attn", "single_transformer_blocks.0.attn"}
    assert heads.distance_px.notna().all() and heads.entropy_norm.between(0, 1).all()
    manifest = json.loads((run / "manifest.json").read_text())
    assert (
        manifest["model"]["process"] == "flow-matching"
        and manifest["model"]["latent"]["image_size"] == 32
    )
    assert set(pd.read_parquet(run / "tables" / "token_maps.parquet").token) == set(
        range(5)
    )  # DAAM on Flux
    assert (
        len(pd.read_parquet(run / "tables" / "gallery.parquet"))
        and (run / "figures" / "attention_gallery.png").exists()
    )
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.slow
def test_sd3_prompts_are_encoded_by_its_three_text_encoders_and_mapped_token_by_token(
    sd3_text_folder, tmp_path
):
    """Keys: CLIP's 8 positions (padding unnamed), then T5's 6; the T5 part is checked against T5 called directly."""
    import transformers

    from diffcircuit.models.loading import load_conditioned

    den = load_conditioned(str(sd3_text_folder), prompt="ab")
    cond = den.conditioning
    assert cond.tokens == (
        "<|startoftext|>",
        "a",
        "b</w>",
        "<|endoftext|>",
        None,
        None,
        None,
        None,
        "\u2581",
        "a",
        "b",
        "</s>",
        None,
        None,
    )
    t5 = transformers.AutoTokenizer.from_pretrained(sd3_text_folder / "tokenizer_3")
    with torch.no_grad():
        direct = transformers.T5EncoderModel.from_pretrained(sd3_text_folder / "text_encoder_3")(
            t5("ab", padding="max_length", max_length=6, return_tensors="pt").input_ids
        )[0]
    torch.testing.assert_close(
        cond.kwargs["encoder_hidden_states"][:, 8:], direct, atol=1e-5, rtol=0
    )
    assert cond.kwargs["pooled_projections"].shape == (1, 16) and cond.unconditional is not None
    assert _run(sd3_text_folder, tmp_path / "run", "--prompt", "ab") == 0
    maps = pd.read_parquet(tmp_path / "run" / "tables" / "token_maps.parquet")
    assert sorted(set(maps.token)) == [
        0,
        1,
        2,
        3,
        8,
        9,
        10,
        11,
    ]  # every named key, none of the padding


@pytest.mark.slow
def test_flux_guidance_and_generation_with_prompts_encoded_by_its_pipeline(
    flux_text_folder, tmp_path
):
    out = tmp_path / "cmp"
    conds = _guidance(
        flux_text_folder,
        out,
        "ab",
        "n: 2\ntimesteps: [300]\nbatch_size: 2\nanalyses: []\nseed_repeats: 0\n",
    )
    assert conds == {
        "conditional": "prompt 'ab'",
        "unconditional": "the empty prompt (unconditional)",
    }
    assert (pd.read_parquet(out / "guidance.parquet").difference.abs() > 0).any()
    grid = tmp_path / "g.png"
    assert (
        main(
            [
                "generate",
                "--out",
                str(grid),
                "--model",
                str(flux_text_folder),
                "--prompt",
                "ab",
                "--guidance",
                "2",
                "--ablate",
                "single_transformer_blocks.0.attn",
                "--n",
                "2",
                "--steps",
                "3",
            ]
        )
        == 0
    )
    record = json.loads(grid.with_suffix(".json").read_text())
    assert len(record["samples"]) == 2 and all(s["pixel_mse"] > 0 for s in record["samples"])


@pytest.mark.slow
def test_sdxl_prompts_feed_both_clips_the_pooled_summary_and_size_conditions_and_a_run_completes(
    sdxl_folder, tmp_path
):
    """Reference: both CLIPs' penultimate hidden states side by side, the second's projected pooled output, and the
    pipeline's default size conditions (h, w, 0, 0, h, w) for 32-pixel images."""
    import transformers

    from diffcircuit.models.loading import load_conditioned

    den = load_conditioned(str(sdxl_folder), prompt="ab")
    tokenizer = transformers.AutoTokenizer.from_pretrained(sdxl_folder / "tokenizer")
    ids = tokenizer("ab", padding="max_length", max_length=8, return_tensors="pt").input_ids
    with torch.no_grad():
        first = transformers.CLIPTextModel.from_pretrained(sdxl_folder / "text_encoder")(
            ids, output_hidden_states=True
        )
        second = transformers.CLIPTextModelWithProjection.from_pretrained(
            sdxl_folder / "text_encoder_2"
        )(ids, output_hidden_states=True)
    kwargs = den.conditioning.kwargs
    torch.testing.assert_close(
        kwargs["encoder_hidden_states"],
        torch.cat([first.hidden_states[-2], second.hidden_states[-2]], -1),
        atol=1e-5,
        rtol=0,
    )
    torch.testing.assert_close(
        kwargs["added_cond_kwargs"]["text_embeds"], second.text_embeds, atol=1e-5, rtol=0
    )
    assert kwargs["added_cond_kwargs"]["time_ids"].tolist() == [[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]]
    assert den.conditioning.tokens[:4] == ("<|startoftext|>", "a", "b</w>", "<|endoftext|>")
    empty = den.conditioning.unconditional  # SDXL's pipeline feeds zeros for the empty prompt
    assert empty.description == "the empty prompt (unconditional), as zeros"
    assert (
        not empty.kwargs["encoder_hidden_states"].any()
        and not empty.kwargs["added_cond_kwargs"]["text_embeds"].any()
    )
    assert _run(sdxl_folder, tmp_path / "run", "--prompt", "ab") == 0
    heads = pd.read_parquet(tmp_path / "run" / "tables" / "head_metrics.parquet")
    assert set(heads[heads.layer.str.endswith("attn2")].n_keys) == {8}
    assert (
        json.loads((tmp_path / "run" / "manifest.json").read_text())["model"]["latent"][
            "image_size"
        ]
        == 32
    )


def _guidance(model, out, prompt: str, config_text: str) -> dict:
    """``diffcircuit guidance`` with a config file beside ``out``; each branch's recorded conditioning."""
    config = out.parent / "run.yaml"
    config.write_text(config_text)
    assert (
        main(
            [
                "guidance",
                "--out",
                str(out),
                "--prompt",
                prompt,
                "--model",
                str(model),
                "--config",
                str(config),
                "--quiet",
            ]
        )
        == 0
    )
    return {
        b: json.loads((out / b / "manifest.json").read_text())["model"]["conditioning"]
        for b in ("conditional", "unconditional")
    }


def _run(model, out, *extra) -> int:
    return main(
        [
            "run",
            "--out",
            str(out),
            "--model",
            str(model),
            "--n",
            "3",
            "--timesteps",
            "20,800",
            "--batch-size",
            "2",
            "--ablate-n",
            "2",
            "--seed-repeats",
            "0",
            "--circuit-resamples",
            "2",
            "--quiet",
            *extra,
        ]
    )


@pytest.mark.slow
def test_run_completes_on_a_text_conditioned_unet_with_the_prompt_as_cross_attention_keys(
    text_pipeline, tmp_path
):
    out = tmp_path / "run"
    assert _run(text_pipeline, out, "--prompt", "a face") == 0
    heads = pd.read_parquet(out / "tables" / "head_metrics.parquet")
    cross = heads[heads.layer.str.endswith("attn2")]
    assert len(cross) and (cross.n_keys == MAX_TOKENS).all() and cross.entropy_nats.notna().all()
    selfs = heads[heads.layer.str.endswith("attn1")]
    assert (
        selfs.distance_frac.notna().all()
    )  # spatial probes work on transformer-block self-attention
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["conditioning"] == "prompt 'a face'"
    ablations = pd.read_parquet(out / "tables" / "ablations.parquet")
    assert ablations.target.str.contains(
        "attn2"
    ).any()  # cross-attention heads are ablated like any other
    tokens = pd.read_parquet(out / "tables" / "token_heatmaps.parquet")
    assert tokens.text.iloc[0] == "<|startoftext|>" and "<|endoftext|>" in set(
        tokens.text
    )  # the prompt's real tokens
    per_head = pd.read_parquet(out / "tables" / "token_maps.parquet")
    assert set(per_head.layer) == set(cross.layer) and set(per_head.timestep) == {20, 800}
    assert (out / "figures" / "token_maps.png").exists() and "Prompt token maps" in (
        out / "report.html"
    ).read_text()


@pytest.mark.slow
def test_run_completes_on_a_dit_with_a_class_label(dit_folder, tmp_path):
    out = tmp_path / "run"
    assert _run(dit_folder, out, "--class-label", "3") == 0
    heads = pd.read_parquet(out / "tables" / "head_metrics.parquet")
    assert set(heads.n_keys) == {64} and heads.distance_frac.notna().all()
    assert json.loads((out / "manifest.json").read_text())["model"]["conditioning"] == "class 3"


@pytest.mark.slow
def test_run_completes_on_a_pixart_transformer_with_prompt_embeddings(pixart_folder, tmp_path):
    out = tmp_path / "run"
    assert (
        _run(
            pixart_folder, out, "--prompt-embeds", str(pixart_folder.parent / "embeds.safetensors")
        )
        == 0
    )
    heads = pd.read_parquet(out / "tables" / "head_metrics.parquet")
    assert set(heads.n_keys) == {64, 5} and (out / "tables" / "token_heatmaps.parquet").exists()


def test_ablating_a_prompt_token_equals_dropping_it_from_the_prompt(text_pipeline, tmp_path):
    import numpy as np

    from diffcircuit import load_images
    from diffcircuit.models.diffusion import add_noise, eps_mse_per_image
    from diffcircuit.models.loading import load_conditioned
    from diffcircuit.models.noise import batch_noise

    out = tmp_path / "ab"
    assert (
        main(
            [
                "ablate",
                "--out",
                str(out),
                "--model",
                str(text_pipeline),
                "--prompt",
                "ab",
                "--data",
                "synthetic",
                "--n",
                "2",
                "--timesteps",
                "300",
                "--level",
                "token",
                "--quiet",
            ]
        )
        == 0
    )
    table = pd.read_parquet(out / "tables" / "ablations.parquet")
    assert sorted(set(table.target)) == [
        "token:0",
        "token:1",
        "token:2",
        "token:3",
    ]  # <start> a b </w>-end
    den = load_conditioned(str(text_pipeline), prompt="ab")
    enc = den.conditioning.kwargs["encoder_hidden_states"]
    x0 = torch.from_numpy(np.asarray(load_images("synthetic", n=2, size=16, channels=3).images))
    eps = batch_noise(x0.shape[1:], seed=0, dataset="synthetic", images=np.arange(2), timestep=300)
    t = torch.full((2,), 300)
    x_t = add_noise(x0, eps, t, den.alphas_cumprod)
    for j in (1, 3):
        dropped = torch.cat([enc[:, :j], enc[:, j + 1 :]], 1).expand(2, -1, -1)
        with torch.no_grad():
            mse = eps_mse_per_image(
                den.eps_hat(den.network(x_t, t, encoder_hidden_states=dropped).sample, x_t, t), eps
            )
        rows = table[table.target == f"token:{j}"].sort_values("image")
        np.testing.assert_allclose(rows.mse_intervened, mse.double().numpy(), rtol=1e-4)


def test_reweighting_a_prompt_token_from_the_cli_equals_diffusers_own_attention_mask(
    text_pipeline, tmp_path
):
    """token:J*W adds log W to token J's logits in every cross-attention head; diffusers adds (1 − m)·(−10000)
    for an encoder_attention_mask m, so m = 1 + log(W)/10000 on token J is the same intervention, done by diffusers."""
    import math

    import numpy as np

    from diffcircuit import load_images
    from diffcircuit.models.diffusion import add_noise, eps_mse_per_image
    from diffcircuit.models.loading import load_conditioned
    from diffcircuit.models.noise import batch_noise

    out = tmp_path / "rw"
    assert (
        main(
            [
                "ablate",
                "--out",
                str(out),
                "--model",
                str(text_pipeline),
                "--prompt",
                "ab",
                "--data",
                "synthetic",
                "--n",
                "2",
                "--timesteps",
                "300",
                "--level",
                "token",
                "--token-weight",
                "3",
                "--target",
                "token:2*0.25",
                "--quiet",
            ]
        )
        == 0
    )
    table = pd.read_parquet(out / "tables" / "ablations.parquet")
    assert sorted(set(table.target)) == [
        "token:0*3",
        "token:1*3",
        "token:2*0.25",
        "token:2*3",
        "token:3*3",
    ]
    assert set(table.method) == {"reweight"}
    den = load_conditioned(str(text_pipeline), prompt="ab")
    x0 = torch.from_numpy(np.asarray(load_images("synthetic", n=2, size=16, channels=3).images))
    eps = batch_noise(x0.shape[1:], seed=0, dataset="synthetic", images=np.arange(2), timestep=300)
    t = torch.full((2,), 300)
    x_t = add_noise(x0, eps, t, den.alphas_cumprod)
    enc = den.conditioning.kwargs["encoder_hidden_states"]
    n_keys = enc.shape[1]
    for j, w in ((1, 3.0), (2, 0.25)):
        mask = torch.ones(2, n_keys, dtype=torch.float64)
        mask[:, j] += math.log(w) / 10000
        with torch.no_grad():
            pred = den.network(
                x_t,
                t,
                encoder_hidden_states=enc.expand(2, -1, -1),
                encoder_attention_mask=mask.float(),
            ).sample
        rows = table[table.target == f"token:{j}*{w:g}"].sort_values("image")
        expected = eps_mse_per_image(den.eps_hat(pred, x_t, t), eps).double().numpy()
        # the change the reweighting makes, compared (the MSEs themselves differ little with random weights)
        np.testing.assert_allclose(
            rows.mse_intervened - rows.mse_clean, expected - rows.mse_clean, rtol=0.02
        )
        assert (rows.mse_intervened != rows.mse_clean).all()
    # one layer only (@LAYER): diffusers' own processor on that layer, given the bias as its attention mask
    from diffusers.models.attention_processor import AttnProcessor2_0

    from diffcircuit.instrument.registry import attention_modules

    layer = next(name for name, m in attention_modules(den.network) if name.endswith("attn2"))
    out = tmp_path / "one"
    assert (
        main(
            [
                "ablate",
                "--out",
                str(out),
                "--model",
                str(text_pipeline),
                "--prompt",
                "ab",
                "--data",
                "synthetic",
                "--n",
                "2",
                "--timesteps",
                "300",
                "--target",
                f"token:1*3@{layer}",
                "--quiet",
            ]
        )
        == 0
    )
    rows = pd.read_parquet(out / "tables" / "ablations.parquet").sort_values("image")
    assert set(rows.target) == {f"token:1*3@{layer}"} and set(rows.n_heads) == {
        dict(attention_modules(den.network))[layer].heads
    }
    bias = torch.zeros(2, 1, n_keys)
    bias[..., 1] = math.log(3.0)
    attn = dict(attention_modules(den.network))[layer]
    original = attn.processor

    class Biased:  # diffusers' processor, with the bias as its (additive) attention mask
        def __call__(
            self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None
        ):
            return AttnProcessor2_0()(attn, hidden_states, encoder_hidden_states, bias, temb)

    attn.set_processor(Biased())
    try:
        with torch.no_grad():
            pred = den.network(x_t, t, encoder_hidden_states=enc.expand(2, -1, -1)).sample
    finally:
        attn.set_processor(original)
    expected = eps_mse_per_image(den.eps_hat(pred, x_t, t), eps).double().numpy()
    np.testing.assert_allclose(
        rows.mse_intervened - rows.mse_clean, expected - rows.mse_clean, rtol=0.02
    )


def test_conditioning_options_that_do_not_fit_the_model_are_refused_in_one_line(
    dit_folder, small_model_dir_module, tmp_path, capsys
):
    for model, extra, words in (
        (small_model_dir_module, ["--prompt", "x"], "is unconditional"),
        (dit_folder, ["--prompt", "x"], "give --class-label"),
        (dit_folder, ["--class-label", "10"], "0..9"),
    ):
        assert _run(model, tmp_path / "run", *extra) != 0
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err
        assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_guidance_analyses_both_branches_and_compares_them_head_by_head(text_pipeline, tmp_path):
    import numpy as np

    out = tmp_path / "cmp"
    conds = _guidance(
        text_pipeline,
        out,
        "a face",
        "n: 3\ntimesteps: [20, 800]\nbatch_size: 2\nablate_n: 0\nseed_repeats: 0\n",
    )
    assert conds == {
        "conditional": "prompt 'a face'",
        "unconditional": "the empty prompt (unconditional)",
    }
    table = pd.read_parquet(out / "guidance.parquet")
    heads = {b: pd.read_parquet(out / b / "tables" / "head_metrics.parquet") for b in conds}
    assert (
        len(table) == heads["conditional"].groupby(["dataset", "timestep", "layer", "head"]).ngroups
    )
    row = table.iloc[len(table) // 2]
    sel = {
        b: h[
            (h.dataset == row.dataset)
            & (h.timestep == row.timestep)
            & (h.layer == row.layer)
            & (h["head"] == row["head"])
        ]
        .sort_values("image")
        .entropy_norm.to_numpy()
        for b, h in heads.items()
    }
    assert row.difference == pytest.approx(
        float(np.mean(sel["conditional"] - sel["unconditional"])), abs=1e-12
    )
    cross = table[table.layer.str.endswith("attn2")]
    assert (cross.difference.abs() > 0).all() and table.p_corrected.between(0, 1).all()
    assert (
        main(["guidance", "--out", str(out), "--prompt", "x", "--model", str(text_pipeline)]) != 0
    )  # exists: refused
