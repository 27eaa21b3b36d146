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

``InstrumentedJointAttnProcessor`` does the same for SD3's joint attention (``JointAttnProcessor2_0``):
image and text tokens are projected separately, attend together over the concatenated keys
[image | text], and are split again after. A joint head's statistics are those of its *image* queries:
entropy and perplexity over all keys (image and text), and the spatial moments of its attention
renormalised over the image keys (where in the image it looks, given that it looks at the image; an
extra fused call over the image keys alone). Interventions act on the head's whole output slice,
image and text queries alike; token reweighting addresses text token j as key n_image + j.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from diffcircuit.instrument.capture import (
    attention_stats_fused,
    attention_stats_naive,
    partner_moments,
)

if TYPE_CHECKING:  # pragma: no cover
    from diffcircuit.instrument.session import InstrumentSession

__all__ = [
    "InstrumentedAttnProcessor",
    "InstrumentedFluxAttnProcessor",
    "InstrumentedJointAttnProcessor",
]


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
            hidden_states = hidden_states.view(b, c, h * w).transpose(
                1, 2
            )  # [batch, q_pos, channels]
        batch, seq_len, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
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
        query = query.view(batch, -1, attn.heads, head_dim).transpose(
            1, 2
        )  # [batch, heads, q_pos, d]
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # [batch, heads, k_pos, d]
        value = value.view(batch, -1, attn.heads, head_dim).transpose(
            1, 2
        )  # [batch, heads, k_pos, d]
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        return query, key, value, attention_mask, residual, shape

    def _attend(self, query, key, value, attention_mask, shape):
        """Attention output ``[batch, heads, q_pos, d]``, recording the statistics the session asks for."""
        session = self.session
        stats = session.statistics_for(self.layer)
        if not stats:
            return F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
            )
        n_keys = key.shape[2]
        feats = (
            session.features_for(shape, n_keys) if "moments" in stats else None
        )  # [batch, k_pos, channels]
        stats_fn = attention_stats_naive if session.method == "naive" else attention_stats_fused
        scale = query.shape[-1] ** -0.5  # what SDPA uses by default, as the default processor does
        out, values = stats_fn(query, key, value, attention_mask, scale, feats, stats)
        partners = (
            session.partners_for(shape, n_keys) if "partner_moments" in stats else None
        )  # [n, k_pos, C]
        if partners is not None:
            values["partner_moments"] = partner_moments(
                query, key, attention_mask, scale, partners, paired=session.partner_paired
            )
        for name, recorded in values.items():
            session.record(self.layer, name, recorded)
        return out

    def _with_bias(
        self, mask, heads: int, n_keys: int, query, offset: int = 0, n_tokens: int | None = None
    ):
        """``mask`` plus the token interventions' additive bias on the chosen heads' logits (if any)."""
        bias = self.session.key_bias(
            self.layer, heads, n_keys, query, offset=offset, n_tokens=n_tokens
        )
        if bias is None:
            return mask
        return bias.to(query.dtype) if mask is None else mask + bias.to(mask.dtype)

    def _merged(self, out, heads: int, dtype):
        """Cache/patch the per-head output ``[batch, heads, q_pos, d]``, then merge heads: ``[batch, q_pos, heads*d]``."""
        out = self.session.head_outputs(self.layer, out)
        return out.transpose(1, 2).reshape(out.shape[0], -1, heads * out.shape[-1]).to(dtype)

    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states=None,
        attention_mask=None,
        temb=None,
        *args,
        **kwargs,
    ):
        query, key, value, mask, residual, shape = self._project(
            attn, hidden_states, encoder_hidden_states, attention_mask, temb
        )
        self.session.note_geometry(self.layer, shape, key.shape[2])
        mask = self._with_bias(mask, attn.heads, key.shape[2], query)
        out = self._attend(query, key, value, mask, shape)
        batch = out.shape[0]
        out = self._merged(out, attn.heads, query.dtype)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if len(shape) == 4:
            out = out.transpose(-1, -2).reshape(batch, shape[1], shape[2], shape[3])
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class InstrumentedJointAttnProcessor(InstrumentedAttnProcessor):
    """Follows diffusers' ``JointAttnProcessor2_0`` (SD3) step for step; see the module docstring."""

    @staticmethod
    def _heads(x, proj, norm, heads: int):
        batch = x.shape[0]
        y = proj(x)
        y = y.view(batch, -1, heads, y.shape[-1] // heads).transpose(1, 2)  # [batch, heads, pos, d]
        return norm(y) if norm is not None else y

    def _attend_joint(self, query, key, value, mask, shape, image: slice):
        """Output ``[batch, heads, q_pos, d]``; captures statistics of the image queries ``image`` (module docstring)."""
        session = self.session
        n_total = query.shape[2]
        stats = session.statistics_for(self.layer)
        if not stats or (image.start, image.stop) == (0, n_total):
            return self._attend(query, key, value, mask, shape)
        stats_fn = attention_stats_naive if session.method == "naive" else attention_stats_fused
        scale = query.shape[-1] ** -0.5
        rows = None if mask is None else mask[:, :, image]
        image_out, values = stats_fn(query[:, :, image], key, value, rows, scale, None, stats)
        n_image = image.stop - image.start
        feats = (
            session.features_for(shape, n_image) if "moments" in stats else None
        )  # [batch, image keys, C]
        if (
            feats is not None
        ):  # moments of the attention renormalised over the image keys (no output needed)
            image_rows = None if mask is None else rows[..., image]
            _, spatial = stats_fn(
                query[:, :, image], key[:, :, image], None, image_rows, scale, feats, ("moments",)
            )
            values["moments"] = spatial["moments"]
        partners = session.partners_for(shape, n_image) if "partner_moments" in stats else None
        if partners is not None:  # as in _attend, whether or not moments were asked for
            image_rows = None if mask is None else rows[..., image]
            values["partner_moments"] = partner_moments(
                query[:, :, image],
                key[:, :, image],
                image_rows,
                scale,
                partners,
                paired=session.partner_paired,
            )
        for name, recorded in values.items():
            session.record(self.layer, name, recorded)

        def text(
            x,
        ):  # the text queries' rows: around the image's ([image | text] in SD3, [text | image] in Flux)
            return torch.cat([x[:, :, : image.start], x[:, :, image.stop :]], dim=2)

        text_out = F.scaled_dot_product_attention(
            text(query), key, value, attn_mask=None if mask is None else text(mask)
        )
        pieces = [
            text_out[:, :, : image.start],
            image_out,
            text_out[:, :, image.start :],
        ]  # back in sequence order
        return torch.cat([p.to(image_out.dtype) for p in pieces], dim=2)

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs
    ):
        n_image = hidden_states.shape[1]  # [batch, image tokens, channels]
        query = self._heads(hidden_states, attn.to_q, attn.norm_q, attn.heads)
        key = self._heads(hidden_states, attn.to_k, attn.norm_k, attn.heads)
        value = self._heads(hidden_states, attn.to_v, None, attn.heads)
        if (
            encoder_hidden_states is not None
        ):  # text tokens, projected by the context projections, appended
            query = torch.cat(
                [
                    query,
                    self._heads(
                        encoder_hidden_states, attn.add_q_proj, attn.norm_added_q, attn.heads
                    ),
                ],
                2,
            )
            key = torch.cat(
                [
                    key,
                    self._heads(
                        encoder_hidden_states, attn.add_k_proj, attn.norm_added_k, attn.heads
                    ),
                ],
                2,
            )
            value = torch.cat(
                [value, self._heads(encoder_hidden_states, attn.add_v_proj, None, attn.heads)], 2
            )
        self.session.note_geometry(self.layer, hidden_states.shape, key.shape[2])
        mask = self._with_bias(
            None, attn.heads, key.shape[2], query, offset=n_image
        )  # the default ignores masks
        out = self._attend_joint(query, key, value, mask, hidden_states.shape, slice(0, n_image))
        out = self._merged(out, attn.heads, query.dtype)  # [batch, image + text, heads*d]
        if encoder_hidden_states is None:
            return attn.to_out[1](attn.to_out[0](out))
        image, text = out[:, :n_image], out[:, n_image:]
        if not attn.context_pre_only:
            text = attn.to_add_out(text)
        return attn.to_out[1](attn.to_out[0](image)), text


class InstrumentedFluxAttnProcessor(InstrumentedJointAttnProcessor):
    """Follows diffusers' ``FluxAttnProcessor`` (native attention backend) step for step.

    Flux's sequence is [text | image]: the double-stream blocks project the two separately (as SD3, text
    first), the single-stream blocks receive the concatenated sequence; rotary position embeddings act on
    queries and keys. The text length a single-stream block cannot see is the one its forward's double-stream
    blocks last saw. Token j is key j.
    """

    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states=None,
        attention_mask=None,
        image_rotary_emb=None,
    ):
        from diffusers.models.embeddings import apply_rotary_emb

        def heads(x, proj, norm):
            y = proj(x).unflatten(-1, (-1, attn.head_dim))  # [batch, pos, heads, d]
            return norm(y) if norm is not None else y

        query = heads(hidden_states, attn.to_q, attn.norm_q)
        key = heads(hidden_states, attn.to_k, attn.norm_k)
        value = heads(hidden_states, attn.to_v, None)
        if attn.added_kv_proj_dim is not None and encoder_hidden_states is not None:
            n_text = encoder_hidden_states.shape[1]
            self.session.text_tokens = n_text
            query = torch.cat(
                [heads(encoder_hidden_states, attn.add_q_proj, attn.norm_added_q), query], 1
            )
            key = torch.cat(
                [heads(encoder_hidden_states, attn.add_k_proj, attn.norm_added_k), key], 1
            )
            value = torch.cat([heads(encoder_hidden_states, attn.add_v_proj, None), value], 1)
        else:  # a single-stream block: hidden_states is already [text | image]
            n_text = self.session.text_tokens if encoder_hidden_states is None else 0
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        query, key, value = (
            x.transpose(1, 2) for x in (query, key, value)
        )  # [batch, heads, pos, d]
        n_total = query.shape[2]
        image_shape = torch.Size(
            (query.shape[0], n_total - n_text, hidden_states.shape[-1])
        )  # the image tokens
        self.session.note_geometry(self.layer, image_shape, n_total)
        mask = self._with_bias(
            attention_mask, attn.heads, n_total, query, offset=0, n_tokens=n_text
        )
        out = self._attend_joint(query, key, value, mask, image_shape, slice(n_text, n_total))
        out = self._merged(out, attn.heads, query.dtype)  # [batch, text + image, heads*d]
        if encoder_hidden_states is None:
            return out
        text, image = out.split(
            [encoder_hidden_states.shape[1], n_total - encoder_hidden_states.shape[1]], dim=1
        )
        return attn.to_out[1](attn.to_out[0](image.contiguous())), attn.to_add_out(
            text.contiguous()
        )
