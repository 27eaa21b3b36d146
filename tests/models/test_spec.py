"""``ModelSpec``: the model's fields, validated when made; every command's config is one."""

from __future__ import annotations

import pytest
import torch

import diffcircuit as dc
from diffcircuit.errors import ConfigError


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(device="tpu"), "device"),
        (dict(precision="fp8"), "precision"),
        (dict(class_label=-1), "class_label"),
        (dict(model=" "), "model"),
        (dict(prompt="a", prompt_embeds="e.safetensors"), "prompt"),
    ],
)
def test_bad_fields_are_refused_naming_the_field(kwargs, field):
    with pytest.raises(ConfigError) as caught:
        dc.ModelSpec(**kwargs)
    assert field in caught.value.fields and str(caught.value).split()[0].strip("'") in (
        field,
        "give",
        "device",
    )


def test_every_commands_config_is_a_model_spec_and_loads_its_denoiser():
    from diffcircuit.commands import AblateConfig, CacheConfig, DiscoverConfig, GenerateConfig

    for cls in (dc.RunConfig, AblateConfig, CacheConfig, DiscoverConfig, GenerateConfig):
        assert issubclass(cls, dc.ModelSpec)
    cfg = AblateConfig(device="cpu", names=("mid_block.attentions.0:1",))
    assert cfg.model_spec == dc.ModelSpec(device="cpu") and type(cfg.model_spec) is dc.ModelSpec
    den = cfg.load()
    assert den.source == "embedded" and next(den.network.parameters()).device == torch.device("cpu")
    with pytest.raises(ConfigError, match="n >= 1"):
        AblateConfig(n=0)


def test_autocast_follows_the_precision():
    assert dc.ModelSpec(device="cpu").autocast().__class__.__name__ == "nullcontext"
    with dc.ModelSpec(device="cpu", precision="bf16").autocast():
        assert (
            torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        )
