"""Pooled-text models' inputs (``models.pipeline_text``): which networks read a pooled summary, the dimensions
they expect, SDXL's size conditions as its pipeline builds them by default, its zeros for the empty prompt,
prompt tokens named key by key, and folders that cannot encode a prompt refused in one line. (Prompts encoded
by each family's pipeline: ``tests/models/test_flow.py`` and ``tests/integration/test_families_cli.py``.)"""

from __future__ import annotations

import json

import pytest
import torch

from diffcircuit import DiffcircuitError
from diffcircuit.models.pipeline_text import (
    _names,
    encode_with_pipeline,
    is_pooled,
    pooled_dims,
    pooled_kwargs,
    zeros_for_empty_prompt,
)


def _sdxl_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
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
    ).eval()


def test_pooled_models_and_the_dimensions_they_expect(text_unet, tiny_sd3):
    sd3, sdxl = tiny_sd3, _sdxl_unet()
    assert is_pooled(sd3) and is_pooled(sdxl) and not is_pooled(text_unet(text_dim=8))
    assert pooled_dims(sd3) == (16, 8)
    assert pooled_dims(sdxl) == (16, 8)  # the time embedding's input: 8 pooled + 6 size numbers x 4


def test_sdxl_gets_its_pipelines_default_size_conditions_and_runs(tmp_path, tiny_sd3):
    """(h, w, 0, 0, h, w): the image's own size, uncropped; the pixel side is the latent side times the VAE's
    factor (2 per level after the first), 16 x 2³ = 128 with a four-level VAE, 16 without a VAE config."""
    net = _sdxl_unet()
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"block_out_channels": [8, 8, 8, 8]}))
    embeds, pooled = torch.randn(2, 5, 16), torch.randn(2, 8)
    kwargs = pooled_kwargs(net, tmp_path, embeds, pooled)
    assert kwargs["encoder_hidden_states"] is embeds
    assert kwargs["added_cond_kwargs"]["text_embeds"] is pooled
    assert (
        kwargs["added_cond_kwargs"]["time_ids"].tolist()
        == [[128.0, 128.0, 0.0, 0.0, 128.0, 128.0]] * 2
    )
    bare = pooled_kwargs(net, tmp_path / "elsewhere", embeds, pooled)
    assert bare["added_cond_kwargs"]["time_ids"][0].tolist() == [16.0, 16.0, 0.0, 0.0, 16.0, 16.0]
    with torch.no_grad():
        assert net(torch.zeros(2, 4, 16, 16), torch.tensor([3, 3]), **kwargs).sample.shape == (
            2,
            4,
            16,
            16,
        )
    sd3 = pooled_kwargs(tiny_sd3, tmp_path, embeds, pooled)
    assert set(sd3) == {"encoder_hidden_states", "pooled_projections"}
    with pytest.raises(DiffcircuitError, match="expects 16 and 8"):
        pooled_kwargs(net, tmp_path, torch.randn(2, 5, 12), pooled)


def test_sdxl_pipelines_feed_zeros_for_the_empty_prompt_unless_turned_off(tmp_path):
    assert not zeros_for_empty_prompt(tmp_path)  # no model_index.json
    index = tmp_path / "model_index.json"
    index.write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    assert zeros_for_empty_prompt(tmp_path)
    index.write_text(
        json.dumps(
            {"_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": False}
        )
    )
    assert not zeros_for_empty_prompt(tmp_path)
    index.write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    assert not zeros_for_empty_prompt(tmp_path)


def test_key_names_are_the_prompts_tokens_then_none_for_padding(tmp_path, clip_tokenizer_writer):
    pytest.importorskip("transformers", reason="the text extra is not installed")
    tokenizer = clip_tokenizer_writer(tmp_path / "tokenizer", 8)
    ids = tokenizer("ab c").input_ids  # unpadded: start, a, b, c, end
    assert _names(tokenizer, "ab c", 8) == tokenizer.convert_ids_to_tokens(ids) + [None] * (
        8 - len(ids)
    )
    assert _names(tokenizer, "ab c", 8)[:5] == [
        "<|startoftext|>",
        "a",
        "b</w>",
        "c</w>",
        "<|endoftext|>",
    ]
    assert None not in _names(tokenizer, "abcdefghij", 8)  # truncated to the keys there are


@pytest.mark.parametrize(
    ("index", "dirs", "message"),
    [
        (None, [], "no model_index.json"),
        ({"_class_name": "DiTPipeline"}, [], "has no encode_prompt"),
        ({"_class_name": "NoSuchPipeline"}, [], "has no encode_prompt"),
        ({"_class_name": "FluxPipeline"}, ["tokenizer", "text_encoder"], "has no text_encoder_2/"),
    ],
)
def test_folders_that_cannot_encode_a_prompt_are_refused_naming_what_is_missing(
    tmp_path, index, dirs, message
):
    if dirs:  # diffusers' Flux pipeline class is real only with transformers installed
        pytest.importorskip("transformers", reason="the text extra is not installed")
    if index is not None:
        (tmp_path / "model_index.json").write_text(json.dumps(index))
    for name in dirs:
        (tmp_path / name).mkdir()
    with pytest.raises(DiffcircuitError, match=message) as info:
        encode_with_pipeline(tmp_path, ["a face"])
    assert "prompt_embeds" in str(info.value) and "\n" not in str(info.value)
