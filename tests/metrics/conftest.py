"""Fixtures for metrics tests: heads forced to attend by a known rule (planted ground truth for the role null)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from diffcircuit.discovery.planted import (
    centre_logits,
    edge_logits,
    forcing,
    random_logits,
    texture_logits,
)


@pytest.fixture(scope="session")
def forced_heads():
    """``forcing(network, pattern, {layer: [heads]})`` and the patterns: edge, texture, centre, random logits."""
    return SimpleNamespace(
        forcing=forcing,
        edge=edge_logits,
        texture=texture_logits,
        centre=centre_logits,
        random=random_logits,
    )
