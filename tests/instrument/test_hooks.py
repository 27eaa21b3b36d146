"""User hooks, the extension point: a hook that zeroes or doubles one head equals editing that head's
columns of the output projection by hand; a layer hook that masks heads row by row equals one forward per
variant; a recording hook sees the documented shape and context; bad addresses are refused in one line."""

from __future__ import annotations

import copy

import pytest
import torch

import diffcircuit as dc
from diffcircuit import DiffcircuitError
from diffcircuit.instrument.registry import attention_modules

LAYER, HEAD = "down_blocks.1.attentions.0", 2


def _inputs(batch: int = 3):
    gen = torch.Generator().manual_seed(0)
    return torch.randn(batch, 3, 16, 16, generator=gen), torch.full((batch,), 30)


@pytest.mark.parametrize("factor", [0.0, 2.0])
def test_a_hook_scaling_a_head_equals_scaling_its_output_projection_columns(small_unet, factor):
    x, t = _inputs()
    edited = copy.deepcopy(small_unet)
    attn = dict(attention_modules(edited))[LAYER]
    d = attn.inner_dim // attn.heads
    hook = (
        dc.hooks.zero() if factor == 0.0 else (lambda value, ctx: 2.0 * value)
    )  # a user's own function
    with torch.no_grad():
        attn.to_out[0].weight[:, HEAD * d : (HEAD + 1) * d] *= factor
        expected = edited(x, t).sample
        with dc.instrument(small_unet, hooks={f"{LAYER}:{HEAD}": hook}):
            got = small_unet(x, t).sample
        clean = small_unet(x, t).sample
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert (got - clean).abs().max().item() > 1e-4  # the hook did something


def test_a_row_masked_layer_hook_equals_one_forward_per_variant(small_unet):
    x, t = _inputs(batch=2)
    with torch.no_grad():
        separate = []
        for heads in ([0], [1, 3]):
            with dc.instrument(small_unet, zero_heads=[f"{LAYER}:{h}" for h in heads]):
                separate.append(small_unet(x, t).sample)
        mask = torch.zeros(4, 4, dtype=torch.bool)  # rows: variant 0's two images, then variant 1's
        mask[:2, 0] = True
        mask[2:, [1, 3]] = True
        with dc.instrument(small_unet, hooks={LAYER: dc.hooks.rows_where(mask, 0.0)}):
            stacked = small_unet(x.repeat(2, 1, 1, 1), t.repeat(2)).sample
    torch.testing.assert_close(stacked, torch.cat(separate), atol=1e-5, rtol=0)


def test_a_recording_hook_sees_the_head_slice_and_its_context(small_unet):
    x, t = _inputs()
    seen = []
    with (
        torch.no_grad(),
        dc.instrument(
            small_unet, hooks={f"{LAYER}:{HEAD}": lambda v, ctx: seen.append((v.shape, ctx))}
        ),
    ):
        clean_inside = small_unet(x, t).sample
    with torch.no_grad():
        clean = small_unet(x, t).sample
    ((shape, ctx),) = seen
    heads = dict(attention_modules(small_unet))[LAYER].heads
    d = dict(attention_modules(small_unet))[LAYER].inner_dim // heads
    assert shape == (3, 16 * 16 // 4, d) and (ctx.layer, ctx.head, ctx.address, ctx.batch) == (
        LAYER,
        HEAD,
        f"{LAYER}:{HEAD}",
        3,
    )
    torch.testing.assert_close(
        clean_inside, clean, atol=1e-5, rtol=0
    )  # returning None changes nothing


def test_hooks_at_unknown_addresses_or_of_the_wrong_shape_are_refused_in_one_line(small_unet):
    x, t = _inputs()
    with pytest.raises(DiffcircuitError, match="no attention layer"):
        with dc.instrument(small_unet, hooks={"nowhere.attn:0": dc.hooks.zero()}):
            pass
    with pytest.raises(DiffcircuitError, match="returned shape"):
        with torch.no_grad(), dc.instrument(small_unet, hooks={LAYER: lambda v, ctx: v[:1]}):
            small_unet(x, t)
