from __future__ import annotations

import pytest
from diffusers.models.attention_processor import Attention

from diffcircuit import DiffcircuitError, HeadRegistry
from diffcircuit.instrument.registry import layer_kind


def test_layer_kind_distinguishes_self_and_cross_attention():
    assert layer_kind(Attention(query_dim=16, heads=2, dim_head=8)) == "self"
    assert (
        layer_kind(Attention(query_dim=16, cross_attention_dim=12, heads=2, dim_head=8)) == "cross"
    )


@pytest.mark.parametrize(
    "bad",
    ["mid_block.attentions.0", "mid_block.attentions.0:x", "nope:0", "mid_block.attentions.0:99"],
)
def test_bad_addresses_are_refused_with_a_clear_error(small_unet, bad):
    registry = HeadRegistry.from_model(small_unet)
    with pytest.raises(DiffcircuitError):
        registry.parse(bad)


def test_model_without_attention_is_refused():
    import torch

    with pytest.raises(DiffcircuitError, match="no diffusers Attention"):
        HeadRegistry.from_model(torch.nn.Linear(2, 2))
