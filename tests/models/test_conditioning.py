"""Conditioning fed to every call of a conditional denoiser (``models.conditioning``): one row expanded to a batch,
or each captioned image's own row, checked element by element."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffcircuit import DiffcircuitError
from diffcircuit.models import Conditioning
from diffcircuit.models.conditioning import Captions, conditioning_kwargs


def _one_prompt():
    g = torch.Generator().manual_seed(0)
    return Conditioning(
        {
            "encoder_hidden_states": torch.randn(1, 5, 8, generator=g),
            "added_cond_kwargs": {
                "text_embeds": torch.randn(1, 4, generator=g),
                "resolution": None,
            },
            "return_dict": True,
        },
        "prompt 'x'",
    )


def test_one_row_is_repeated_for_every_image_of_a_batch_nested_inputs_too():
    cond = _one_prompt()
    kwargs = conditioning_kwargs(cond, 3, torch.device("cpu"))
    embeds = kwargs["encoder_hidden_states"]
    assert embeds.shape == (3, 5, 8)
    for i in range(3):
        assert torch.equal(embeds[i], cond.kwargs["encoder_hidden_states"][0])
        assert torch.equal(
            kwargs["added_cond_kwargs"]["text_embeds"][i],
            cond.kwargs["added_cond_kwargs"]["text_embeds"][0],
        )
    assert kwargs["added_cond_kwargs"]["resolution"] is None and kwargs["return_dict"] is True


def test_captioned_rows_give_each_image_its_own_caption():
    table = torch.arange(4 * 3 * 2, dtype=torch.float32).view(4, 3, 2)  # one row per image
    mask = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1], [1, 0, 0]])
    cond = Conditioning(
        {"encoder_hidden_states": table, "encoder_attention_mask": mask}, "captions"
    )
    rows = torch.tensor([2, 0, 2])
    kwargs = conditioning_kwargs(cond, 3, torch.device("cpu"), rows)
    assert torch.equal(kwargs["encoder_hidden_states"], torch.stack([table[2], table[0], table[2]]))
    assert torch.equal(kwargs["encoder_attention_mask"], torch.stack([mask[2], mask[0], mask[2]]))
    with pytest.raises(DiffcircuitError, match="batch of 2 images was given 3"):
        conditioning_kwargs(cond, 2, torch.device("cpu"), rows)


def test_key_counts_are_each_captions_unmasked_keys_and_none_without_a_mask():
    mask = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1]])
    masked = Captions(Conditioning({"encoder_attention_mask": mask}, "captions"), ((), (), ()))
    assert masked.key_counts(np.array([2, 0, 1, 1])).tolist() == [3, 1, 2, 2]
    unmasked = Captions(Conditioning({"encoder_hidden_states": torch.zeros(3, 3, 2)}, "c"), ())
    assert unmasked.key_counts([0, 1]) is None
