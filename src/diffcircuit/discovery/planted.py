"""Planted ground truth (as InterpBench does for language models): edit a copy of a model so that
some heads are known to be dead and one is known to be essential, then check discovery against it.

- a *dead* head has its output-projection columns zeroed: it cannot affect anything;
- the *essential* head is the only live head of a layer whose removal matters (every other head of
  that layer is made dead), so the layer's whole contribution flows through it.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from diffcircuit.instrument.registry import attention_modules

__all__ = ["PlantedModel", "plant", "zero_heads"]


def zero_heads(net: torch.nn.Module, addresses: Sequence[str]) -> None:
    """Zero the output-projection columns of each ``layer:head`` in place."""
    layers = dict(attention_modules(net))
    with torch.no_grad():
        for address in addresses:
            layer, head = address.rsplit(":", 1)
            attn, h = layers[layer], int(head)
            d = attn.inner_dim // attn.heads
            attn.to_out[0].weight[:, h * d:(h + 1) * d] = 0


@dataclass(frozen=True)
class PlantedModel:
    network: torch.nn.Module
    dead: tuple[str, ...]
    essential: str


def plant(net: torch.nn.Module, *, dead: Sequence[str], essential_layer: str, essential_head: int) -> PlantedModel:
    """A copy of ``net`` with ``dead`` heads (outside the essential layer) and the essential head planted."""
    planted = copy.deepcopy(net)
    heads = dict(attention_modules(planted))[essential_layer].heads
    dead = tuple(a for a in dead if not a.startswith(essential_layer + ":"))
    zero_heads(planted, [*dead, *(f"{essential_layer}:{h}" for h in range(heads) if h != essential_head)])
    return PlantedModel(network=planted, dead=dead, essential=f"{essential_layer}:{essential_head}")
