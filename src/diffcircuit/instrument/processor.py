"""The capturing and intervening attention processor, installed through diffusers' processor seam.

It follows diffusers' ``AttnProcessor2_0`` step for step, so with nothing to capture and nothing
to change it *is* the default computation (same SDPA call, same reshapes). When its session asks,
it also

- captures per-head statistics of the true softmax (entropy, perplexity and feature moments; see
  ``capture.py``), by default through a fused kernel that never materialises the probabilities, and
- caches each head's slice of the attention output *before* the output projection ``to_out``
  mixes heads, and replaces slices with given values there (zero ablation: the slice is set to 0;
  mean, resample, noise and activation patching put other tensors in its place), and
- reweights chosen keys (prompt tokens) in chosen heads by an additive bias on their logits.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch.nn.functional as F

from diffcircuit.instrument.capture import attention_stats_fused, attention_stats_naive

if TYPE_CHECKING:  # pragma: no cover
    from diffcircuit.instrument.session import InstrumentSession

__all__ = ["InstrumentedAttnProcessor"]


class InstrumentedAttnProcessor:
    """Per-layer processor; all state lives in the shared ``InstrumentSession``."""

    def __init__(self, layer: str, session: InstrumentSession):
        self.layer = layer
        self.session = session

    def _project(self, attn, hidden_states, encoder_hidden_states, attention_mask, temb):
        """The default processor's steps up to SDPA: returns q, k, v ``[batch, heads, pos, head_dim]``."""
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        shape = hidden_states.shape
        if hidden_states.ndim == 4:
            b, c, h, w = shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)  # [batch, q_pos, channels]
        batch, seq_len, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # [batch, heads, q_pos, d]
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # [batch, heads, k_pos, d]
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # [batch, heads, k_pos, d]
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        return query, key, value, attention_mask, residual, shape

    def _attend(self, query, key, value, attention_mask, shape):
        """Attention output ``[batch, heads, q_pos, d]``, recording statistics when capturing."""
        session = self.session
        if not session.captures(self.layer):
            return F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)
        feats = session.features_for(shape, key.shape[2])  # [batch, k_pos, channels] or None
        stats_fn = attention_stats_naive if session.method == "naive" else attention_stats_fused
        scale = query.shape[-1] ** -0.5  # what SDPA uses by default, as the default processor does
        out, stats = stats_fn(query, key, value, attention_mask, scale, feats)
        for name, values in stats.items():
            session._record(self.layer, name, values)
        return out

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        query, key, value, mask, residual, shape = self._project(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        self.session._note_geometry(self.layer, shape, key.shape[2])
        bias = self.session.key_bias(self.layer, attn.heads, key.shape[2], query)
        if bias is not None:  # token interventions: an additive bias on the chosen heads' logits
            mask = bias.to(query.dtype) if mask is None else mask + bias.to(mask.dtype)
        out = self._attend(query, key, value, mask, shape)
        out = self.session._head_outputs(self.layer, out)  # [batch, heads, q_pos, d]: cache and/or patch
        batch = out.shape[0]
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * out.shape[-1]).to(query.dtype)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if len(shape) == 4:
            out = out.transpose(-1, -2).reshape(batch, shape[1], shape[2], shape[3])
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor
