"""Shared fixtures: small random-weight diffusers models built from configs, saved as local folders."""

from __future__ import annotations

import json

import pytest
import torch

SMALL_UNET = dict(
    sample_size=16,
    in_channels=3,
    out_channels=3,
    layers_per_block=1,
    block_out_channels=(16, 32),
    down_block_types=("AttnDownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "AttnUpBlock2D"),
    attention_head_dim=8,
    norm_num_groups=8,
)


def make_small_unet(seed: int = 0):
    """A 16x16 UNet2DModel with attention at 16x16, 8x8 and mid; random weights."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(**SMALL_UNET).eval()


def make_text_unet(
    *, text_dim: int, in_channels: int = 4, sample_size: int = 16, channels=(32, 64), seed: int = 0
):
    """A small UNet2DConditionModel (cross-attention in the first down and last up block); random weights."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels,
        layers_per_block=1,
        block_out_channels=channels,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=text_dim,
        attention_head_dim=8,
        norm_num_groups=8,
    ).eval()


def make_autoencoder(kind: str = "vae", latent_channels: int = 4):
    """A tiny 32x32 -> 16x16 autoencoder: AutoencoderKL (scaling 0.5, shift 0.1) or VQModel (``kind`` "vqvae")."""
    from diffusers import AutoencoderKL, VQModel

    torch.manual_seed(0)
    blocks = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=32,
    )
    if kind == "vqvae":
        return VQModel(**blocks, num_vq_embeddings=16, vq_embed_dim=latent_channels)
    return AutoencoderKL(**blocks, scaling_factor=0.5, shift_factor=0.1)


@pytest.fixture(scope="session")
def autoencoder():
    return make_autoencoder


@pytest.fixture(scope="session")
def text_unet():
    """``make_text_unet(text_dim=...)``: small text-conditioned UNets for tests."""
    return make_text_unet


@pytest.fixture
def small_unet():
    return make_small_unet()


@pytest.fixture
def small_model_dir(tmp_path):
    """A local diffusers pipeline folder (model_index.json, unet/, scheduler/) with safetensors."""
    from diffusers import DDPMScheduler

    from diffcircuit.models.loading import save_denoiser

    return save_denoiser(
        tmp_path / "small-model", make_small_unet(), DDPMScheduler(num_train_timesteps=1000)
    )


@pytest.fixture(scope="module")
def small_model_dir_module(tmp_path_factory):
    """``small_model_dir``, shared by a module's tests."""
    from diffusers import DDPMScheduler

    from diffcircuit.models.loading import save_denoiser

    return save_denoiser(
        tmp_path_factory.mktemp("model") / "small-model",
        make_small_unet(),
        DDPMScheduler(num_train_timesteps=1000),
    )


def _run_outputs(run_dir):
    """Every table and JSON result of a run directory (not run.log, whose times differ)."""
    import json

    import pandas as pd

    out = {
        f"tables/{p.name}": pd.read_parquet(p)
        for p in sorted((run_dir / "tables").glob("*.parquet"))
    }
    for p in [
        run_dir / "summary.json",
        run_dir / "manifest.json",
        *sorted((run_dir / "circuits").glob("*.json")),
    ]:
        out[str(p.relative_to(run_dir))] = json.loads(p.read_text())
    out["manifest.json"].pop("cost", None)  # what the run cost (seconds differ), not what it found
    return out


def _assert_same_outputs(a: dict, b: dict) -> None:
    """Two runs' outputs are identical: tables exactly (bit for bit), JSON equal."""
    import pandas as pd

    assert a.keys() == b.keys()
    for name in a:
        if isinstance(a[name], pd.DataFrame):
            pd.testing.assert_frame_equal(a[name], b[name], check_exact=True, obj=name)
        else:
            assert a[name] == b[name], name


@pytest.fixture(scope="session")
def run_outputs():
    """``run_outputs(run_dir)``: every table and JSON result of a run directory."""
    return _run_outputs


@pytest.fixture(scope="session")
def assert_same_outputs():
    """``assert_same_outputs(a, b)``: two runs' outputs are identical."""
    return _assert_same_outputs


@pytest.fixture(scope="session")
def flux_folder(tmp_path_factory, autoencoder):
    """A tiny Flux pipeline folder: packed latents of a 4-channel autoencoder, resolution-shifted σ, distilled guidance."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        pooled_projection_dim=8,
        axes_dims_rope=(2, 2, 4),
        guidance_embeds=True,
    )
    root = tmp_path_factory.mktemp("flux") / "flux"
    net.save_pretrained(root / "transformer", safe_serialization=True)
    autoencoder("vae", 4).save_pretrained(root / "vae", safe_serialization=True)
    FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_image_seq_len=16, max_image_seq_len=256
    ).save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "FluxPipeline",
                "transformer": ["diffusers", "FluxTransformer2DModel"],
                "vae": ["diffusers", "AutoencoderKL"],
                "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            }
        )
    )
    save_file(
        {"prompt_embeds": torch.randn(1, 5, 16), "pooled_prompt_embeds": torch.randn(1, 8)},
        str(root.parent / "embeds.safetensors"),
    )  # T5 tokens and CLIP's pooled summary, precomputed
    return root


def write_clip_tokenizer(folder, max_length: int):
    """A CLIP tokenizer whose words are single letters (offline: vocabulary and merges written here)."""
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = transformers.CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length
    )
    tokenizer.save_pretrained(folder)
    return tokenizer


def write_t5(root, *, d_model: int, max_length: int):
    """A T5 tokenizer (letters as Unigram pieces) in ``root/tokenizer_*`` and its encoder, for pipelines that read T5."""
    import transformers

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)] + [
        (c, -1.0) for c in "abcdefghijklmnopqrstuvwxyz"
    ]
    tokenizer = transformers.T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=max_length)
    torch.manual_seed(2)
    encoder = transformers.T5EncoderModel(
        transformers.T5Config(
            vocab_size=len(pieces), d_model=d_model, d_kv=8, d_ff=32, num_layers=1, num_heads=2
        )
    )
    return tokenizer, encoder


@pytest.fixture(scope="session")
def flux_text_folder(tmp_path_factory, flux_folder):
    """``flux_folder`` with its pipeline's text encoders: CLIP (pooled summary) and T5 (the tokens)."""
    import shutil

    import transformers

    root = tmp_path_factory.mktemp("flux-text") / "flux"
    shutil.copytree(flux_folder, root)
    write_clip_tokenizer(root / "tokenizer", 8)
    torch.manual_seed(1)
    transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            vocab_size=54,
            hidden_size=8,
            intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=8,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    ).save_pretrained(root / "text_encoder")
    tokenizer, encoder = write_t5(root, d_model=16, max_length=6)
    tokenizer.save_pretrained(root / "tokenizer_2")
    encoder.save_pretrained(root / "text_encoder_2")
    index = json.loads((root / "model_index.json").read_text())
    index |= {
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "text_encoder_2": ["transformers", "T5EncoderModel"],
        "tokenizer_2": ["transformers", "T5TokenizerFast"],
    }
    (root / "model_index.json").write_text(json.dumps(index))
    return root


@pytest.fixture(scope="session")
def clip_tokenizer_writer():
    return write_clip_tokenizer


@pytest.fixture(scope="session")
def t5_writer():
    return write_t5


def write_sd3(root, *, pooled_dim: int) -> None:
    """A tiny SD3 transformer (2 joint blocks on 4x4 patches of 8x8 inputs) and its flow scheduler (shift 3)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    torch.manual_seed(0)
    SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=3,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        caption_projection_dim=16,
        pooled_projection_dim=pooled_dim,
        out_channels=3,
        pos_embed_max_size=8,
    ).save_pretrained(root / "transformer")
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(root / "scheduler")


@pytest.fixture(scope="session")
def sd3_text_folder(tmp_path_factory):
    """A tiny SD3 pipeline with its three text encoders (two CLIPs with projections, T5) and a flow scheduler."""
    import transformers

    root = tmp_path_factory.mktemp("sd3-text") / "sd3"
    write_sd3(root, pooled_dim=16)  # the two CLIPs' pooled outputs side by side
    for i, sub in enumerate(("", "_2")):
        write_clip_tokenizer(root / f"tokenizer{sub}", 8)
        torch.manual_seed(10 + i)
        transformers.CLIPTextModelWithProjection(
            transformers.CLIPTextConfig(
                vocab_size=54,
                hidden_size=8,
                intermediate_size=16,
                num_hidden_layers=2,
                num_attention_heads=2,
                max_position_embeddings=8,
                projection_dim=8,
                bos_token_id=0,
                eos_token_id=1,
                pad_token_id=1,
            )
        ).save_pretrained(root / f"text_encoder{sub}")
    tokenizer, encoder = write_t5(root, d_model=16, max_length=6)
    tokenizer.save_pretrained(root / "tokenizer_3")
    encoder.save_pretrained(root / "text_encoder_3")
    clip = ["transformers", "CLIPTextModelWithProjection"]
    (root / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "StableDiffusion3Pipeline",
                "transformer": ["diffusers", "SD3Transformer2DModel"],
                "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
                "text_encoder": clip,
                "text_encoder_2": clip,
                "text_encoder_3": ["transformers", "T5EncoderModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "tokenizer_2": ["transformers", "CLIPTokenizer"],
                "tokenizer_3": ["transformers", "T5TokenizerFast"],
            }
        )
    )
    return root


@pytest.fixture(scope="session")
def sd3_folder(tmp_path_factory):
    """A tiny SD3 pipeline folder: joint attention, a flow-matching scheduler (shift 3), and precomputed prompt
    embeddings beside it (``embeds.safetensors``)."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("sd3") / "tiny-sd3"
    write_sd3(root, pooled_dim=8)
    (root / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "StableDiffusion3Pipeline",
                "transformer": ["diffusers", "SD3Transformer2DModel"],
                "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            }
        )
    )
    save_file(
        {"prompt_embeds": torch.randn(1, 5, 16), "pooled_prompt_embeds": torch.randn(1, 8)},
        str(root.parent / "embeds.safetensors"),
    )
    return root


@pytest.fixture(scope="session")
def sdxl_folder(tmp_path_factory, autoencoder):
    """A tiny SDXL pipeline: a UNet with text-time added conditions on a 4-channel VAE's latents, two CLIP text
    encoders (the second with a projection: the pooled summary) and an Euler scheduler config."""
    import transformers
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel

    root = tmp_path_factory.mktemp("sdxl") / "sdxl"
    torch.manual_seed(0)
    UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=8,
        norm_num_groups=8,
        addition_embed_type="text_time",
        addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=8 + 6 * 4,
    ).save_pretrained(root / "unet")
    autoencoder("vae", 4).save_pretrained(root / "vae")
    EulerDiscreteScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012
    ).save_pretrained(root / "scheduler")
    config = dict(
        vocab_size=54,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=8,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    for i, (sub, cls) in enumerate(
        (("", transformers.CLIPTextModel), ("_2", transformers.CLIPTextModelWithProjection))
    ):
        write_clip_tokenizer(root / f"tokenizer{sub}", 8)
        torch.manual_seed(20 + i)
        cls(transformers.CLIPTextConfig(**config, projection_dim=8)).save_pretrained(
            root / f"text_encoder{sub}"
        )
    (root / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "StableDiffusionXLPipeline",
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"],
                "scheduler": ["diffusers", "EulerDiscreteScheduler"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "tokenizer_2": ["transformers", "CLIPTokenizer"],
            }
        )
    )
    return root


def write_transformer_folder(root, net, pipeline: str):
    """A diffusers pipeline folder for a transformer denoiser: transformer/, scheduler/ (DDPM), model_index.json."""
    from diffusers import DDPMScheduler

    net.save_pretrained(root / "transformer", safe_serialization=True)
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": pipeline,
                "transformer": ["diffusers", type(net).__name__],
                "scheduler": ["diffusers", "DDPMScheduler"],
            }
        )
    )
    return root


@pytest.fixture(scope="session")
def dit_folder(tmp_path_factory):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    net = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=3,
        out_channels=6,
        num_layers=2,
        sample_size=16,
        patch_size=2,
        num_embeds_ada_norm=10,
    )
    return write_transformer_folder(tmp_path_factory.mktemp("dit") / "tiny-dit", net, "DiTPipeline")


@pytest.fixture(scope="session")
def pixart_folder(tmp_path_factory):
    from diffusers import PixArtTransformer2DModel
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=3,
        out_channels=6,
        num_layers=2,
        sample_size=16,
        patch_size=2,
        cross_attention_dim=16,
        caption_channels=12,
        norm_num_groups=8,
    )
    root = write_transformer_folder(
        tmp_path_factory.mktemp("pixart") / "tiny-pixart", net, "PixArtAlphaPipeline"
    )
    save_file(
        {"prompt_embeds": torch.randn(1, 5, 12)}, str(root.parent / "embeds.safetensors")
    )  # e.g. T5's, precomputed
    return root


@pytest.fixture(scope="session")
def transformer_folder():
    """``transformer_folder(root, net, pipeline)``: a pipeline folder for a transformer denoiser."""
    return write_transformer_folder


@pytest.fixture(scope="session")
def pixart_text_folder(tmp_path_factory, pixart_folder, t5_writer):
    """``pixart_folder`` with its pipeline's T5 tokenizer and encoder."""
    import shutil

    root = tmp_path_factory.mktemp("pixart-text") / "pixart"
    shutil.copytree(pixart_folder, root)
    tokenizer, encoder = t5_writer(root, d_model=12, max_length=10)
    tokenizer.save_pretrained(root / "tokenizer")
    encoder.save_pretrained(root / "text_encoder")
    index = json.loads((root / "model_index.json").read_text())
    index |= {
        "text_encoder": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "T5TokenizerFast"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (root / "model_index.json").write_text(json.dumps(index))
    return root


def write_captioned_folder(root, captions: dict[str, str], size: int = 16):
    import numpy as np
    import pandas as pd
    from PIL import Image

    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in captions:
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / name)
    pd.DataFrame({"file": list(captions), "caption": list(captions.values())}).to_csv(
        root / "captions.csv", index=False
    )
    return root


@pytest.fixture(scope="session")
def captioned_folder():
    """``captioned_folder(root, {file: caption})``: an image folder with captions.csv."""
    return write_captioned_folder
