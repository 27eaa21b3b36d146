"""What a conditional network needs besides (x_t, t) (``models.needs``), on tiny diffusers networks of each kind:
an unconditional UNet, a text UNet, a class-conditional UNet, DiT, PixArt and SD3; and whether the inputs it is
given make it run."""

from __future__ import annotations

import pytest
import torch

from diffcircuit import DiffcircuitError
from diffcircuit.errors import ConfigError
from diffcircuit.models.needs import added_conditions, class_labels, needed_inputs, placeholder_text


def _dit():
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    return DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=3,
        out_channels=6,
        num_layers=1,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=10,
    ).eval()


def _pixart(sample_size=8):
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    return PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=3,
        out_channels=6,
        num_layers=1,
        sample_size=sample_size,
        patch_size=2,
        cross_attention_dim=16,
        caption_channels=12,
        norm_num_groups=8,
    ).eval()


def test_an_unconditional_unet_needs_nothing(small_unet):
    assert needed_inputs(small_unet) == [] and placeholder_text(small_unet) is None
    assert added_conditions(small_unet) == {}


def test_a_text_unet_needs_text_and_runs_on_one_placeholder_token(text_unet):
    net = text_unet(text_dim=8, in_channels=3)
    assert needed_inputs(net) == ["encoder_hidden_states"]
    cond = placeholder_text(net)
    assert set(cond.kwargs) == {"encoder_hidden_states"}
    assert torch.equal(cond.kwargs["encoder_hidden_states"], torch.zeros(1, 1, 8))
    with torch.no_grad():
        out = net(torch.zeros(1, 3, 16, 16), torch.tensor([10]), **cond.kwargs).sample
    assert out.shape == (1, 3, 16, 16)


def test_a_dit_needs_a_label_and_its_null_class_is_the_extra_row_of_its_label_table():
    net = _dit()
    assert needed_inputs(net) == ["class_labels"] and placeholder_text(net) is None
    null = class_labels(net, None)
    assert null.kwargs["class_labels"].tolist() == [
        10
    ]  # ten classes: rows 0..9, the null class is row 10
    assert null.description == "null class 10 (unconditional)"
    three = class_labels(net, 3)
    assert three.kwargs["class_labels"].tolist() == [3] and three.description == "class 3"
    with torch.no_grad():  # both run the network
        for cond in (null, three):
            net(torch.zeros(1, 3, 8, 8), timestep=torch.tensor([5]), **cond.kwargs)
    with pytest.raises(ConfigError, match=r"class_label must be in 0\.\.9, not 10"):
        class_labels(net, 10)


def test_a_class_conditional_unet_without_a_null_class_needs_a_label():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    net = UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        num_class_embeds=5,
    )
    assert needed_inputs(net) == ["class_labels"]
    with pytest.raises(DiffcircuitError, match="has no null class"):
        class_labels(net, None)
    assert class_labels(net, 4).kwargs["class_labels"].tolist() == [4]
    with pytest.raises(ConfigError, match=r"0\.\.4"):
        class_labels(net, 5)


def test_pixart_needs_text_and_its_micro_conditions_where_it_uses_them():
    net = _pixart()
    assert needed_inputs(net) == [
        "encoder_hidden_states"
    ]  # optional in the signature, needed in fact
    cond = placeholder_text(net)
    assert torch.equal(
        cond.kwargs["encoder_hidden_states"], torch.zeros(1, 1, 12)
    )  # caption channels
    assert cond.kwargs["added_cond_kwargs"] == {"resolution": None, "aspect_ratio": None}
    with torch.no_grad():
        net(torch.zeros(1, 3, 8, 8), timestep=torch.tensor([5]), **cond.kwargs)
    big = _pixart(sample_size=128)  # PixArt-α at 1024 px: micro-conditions on
    conditions = added_conditions(big)["added_cond_kwargs"]
    assert conditions["resolution"].tolist() == [[1024.0, 1024.0]]  # 128 latents x 8
    assert conditions["aspect_ratio"].tolist() == [[1.0]]


def test_sd3_needs_text_tokens_and_a_pooled_summary_and_gets_no_placeholder(tiny_sd3):
    net = tiny_sd3
    assert needed_inputs(net) == ["encoder_hidden_states", "pooled_projections"]
    assert placeholder_text(net) is None
