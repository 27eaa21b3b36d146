"""Token interventions: reweighting (or removing) one prompt token's attention in chosen cross-attention heads,
checked against independent computations: removing a token from every cross-attention head equals running
without that token, and a reweighted head equals a plain-PyTorch softmax with that column scaled and renormalised."""

from __future__ import annotations

import pytest
import torch

from diffcircuit import instrument, probe_registry

TOKENS, TEXT_DIM = 6, 12


class _Holder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        from diffusers.models.attention_processor import Attention

        self.attn = Attention(query_dim=16, cross_attention_dim=TEXT_DIM, heads=2, dim_head=8)

    def forward(self, x, enc):
        return self.attn(x, encoder_hidden_states=enc)


def _reference(attn, x, enc, head: int, token: int, weight: float) -> torch.Tensor:
    """The layer's output with head ``head``'s attention to ``token`` multiplied by ``weight`` and renormalised."""
    b, n, _ = x.shape
    q = attn.to_q(x).view(b, n, 2, 8).transpose(1, 2)
    k = attn.to_k(enc).view(b, TOKENS, 2, 8).transpose(1, 2)
    v = attn.to_v(enc).view(b, TOKENS, 2, 8).transpose(1, 2)
    probs = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, dim=-1)
    probs[:, head, :, token] *= weight
    probs = probs / probs.sum(-1, keepdim=True)
    out = (probs @ v).transpose(1, 2).reshape(b, n, 16)
    return attn.to_out[1](attn.to_out[0](out))


@pytest.mark.parametrize("weight", [0.0, 0.5, 3.0])
def test_a_reweighted_token_equals_a_plain_renormalised_softmax(weight):
    torch.manual_seed(0)
    model = _Holder().eval()
    x, enc = torch.randn(2, 9, 16), torch.randn(2, TOKENS, TEXT_DIM)
    with torch.no_grad(), instrument(model, token_scales={"attn:1": {4: weight}}):
        got = model(x, enc)
    with torch.no_grad():
        torch.testing.assert_close(
            got,
            _reference(model.attn, x, enc, head=1, token=4, weight=weight),
            atol=1e-5,
            rtol=1e-5,
        )
        untouched = _reference(model.attn, x, enc, head=1, token=4, weight=1.0)
    assert weight == 1.0 or not torch.allclose(
        got, untouched, atol=1e-4
    )  # the intervention did something


def test_removing_a_token_from_every_cross_attention_head_equals_dropping_it_from_the_prompt(
    text_unet,
):
    net = text_unet(text_dim=TEXT_DIM)
    x, t, enc = torch.randn(2, 4, 16, 16), torch.tensor([10, 600]), torch.randn(2, TOKENS, TEXT_DIM)
    registry = probe_registry(net, x, t, encoder_hidden_states=enc)
    drop = 2
    every_cross_head = {
        str(a): {drop: 0.0} for a in registry if registry.layer(a.layer).kind == "cross"
    }
    with torch.no_grad():
        with instrument(net, registry=registry, token_scales=every_cross_head):
            removed = net(x, t, encoder_hidden_states=enc).sample
        without = net(
            x, t, encoder_hidden_states=torch.cat([enc[:, :drop], enc[:, drop + 1 :]], 1)
        ).sample
        full = net(x, t, encoder_hidden_states=enc).sample
    torch.testing.assert_close(removed, without, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(removed, full, atol=1e-4)


def test_token_interventions_refuse_bad_weights_and_keys():
    model = _Holder().eval()
    x, enc = torch.randn(1, 4, 16), torch.randn(1, TOKENS, TEXT_DIM)
    with pytest.raises(ValueError, match=">= 0"):
        with instrument(model, token_scales={"attn:0": {1: -1.0}}):
            pass
    with pytest.raises(ValueError, match="tokens 0..5"):
        with torch.no_grad(), instrument(model, token_scales={"attn:0": {TOKENS: 0.0}}):
            model(x, enc)
