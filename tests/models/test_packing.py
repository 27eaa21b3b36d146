"""Packed latents for Flux-style transformers (``models.packing``), against diffusers' own ``FluxPipeline``
helpers and a reshape written out by hand."""

from __future__ import annotations

import pytest
import torch

from diffcircuit.models.packing import DISTILLED_GUIDANCE, pack, packed_inputs, unpack


def _latents(b=2, c=4, h=6, w=8, seed=0):
    return torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(seed))


def test_each_token_is_one_2x2_patch_channel_major_as_written_out_by_hand():
    x = _latents()
    tokens = pack(x)
    assert tokens.shape == (2, 3 * 4, 4 * 4)
    for i in range(3):
        for j in range(4):
            patch = x[:, :, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2]  # [B, C, 2, 2]
            torch.testing.assert_close(tokens[:, i * 4 + j], patch.reshape(2, -1), atol=0, rtol=0)


def test_unpacking_inverts_packing():
    x = _latents(seed=1)
    torch.testing.assert_close(unpack(pack(x), 6, 8), x, atol=0, rtol=0)
    tokens = torch.randn(3, 12, 8)
    torch.testing.assert_close(pack(unpack(tokens, 6, 8)), tokens, atol=0, rtol=0)


def test_packing_and_positions_are_flux_pipelines_own():
    pytest.importorskip("transformers", reason="FluxPipeline needs the text extra")
    from diffusers import FluxPipeline

    x = _latents(c=4, h=6, w=8, seed=2)
    torch.testing.assert_close(pack(x), FluxPipeline._pack_latents(x, 2, 4, 6, 8), atol=0, rtol=0)
    # the pipeline's unpack takes pixel sizes and the VAE's factor: 6x8 latents are 48x64 pixels at 8
    tokens = pack(x)
    torch.testing.assert_close(
        unpack(tokens, 6, 8), FluxPipeline._unpack_latents(tokens, 48, 64, 8), atol=0, rtol=0
    )
    _, kwargs = packed_inputs(x, {}, distilled=False)
    ids = FluxPipeline._prepare_latent_image_ids(2, 3, 4, "cpu", torch.float32)
    torch.testing.assert_close(kwargs["img_ids"], ids, atol=0, rtol=0)


def test_inputs_name_text_positions_and_guidance_only_where_needed():
    x = _latents()
    text = torch.randn(2, 5, 16)
    tokens, kwargs = packed_inputs(x, {"encoder_hidden_states": text}, distilled=True)
    torch.testing.assert_close(tokens, pack(x), atol=0, rtol=0)
    assert kwargs["encoder_hidden_states"] is text
    torch.testing.assert_close(kwargs["txt_ids"], torch.zeros(5, 3), atol=0, rtol=0)
    torch.testing.assert_close(kwargs["guidance"], torch.full((2,), DISTILLED_GUIDANCE))
    assert kwargs["img_ids"][5].tolist() == [
        0.0,
        1.0,
        1.0,
    ]  # token 5 of a 3x4 grid: row 1, column 1
    _, plain = packed_inputs(x, {}, distilled=False)
    assert set(plain) == {"img_ids"}  # no text, not distilled: positions only
    given = torch.full((2,), 7.0)
    _, kept = packed_inputs(x, {"guidance": given}, distilled=True, guidance=1.0)
    assert kept["guidance"] is given  # a guidance the call gives is not replaced
    _, scaled = packed_inputs(x, {}, distilled=True, guidance=2.5)
    torch.testing.assert_close(scaled["guidance"], torch.full((2,), 2.5))
