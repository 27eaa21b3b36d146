"""Tiny random-weight networks shared by the model tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def tiny_sd3():
    """A one-layer SD3 transformer (2 heads, 16-dim text tokens, an 8-dim pooled summary) on an 8x8 grid."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=3,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        caption_projection_dim=16,
        pooled_projection_dim=8,
        out_channels=3,
        pos_embed_max_size=8,
    )
