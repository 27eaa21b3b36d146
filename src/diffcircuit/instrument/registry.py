"""One stable address for every attention head of a diffusers model.

A head is written ``<module path>:<head index>``, e.g. ``down_blocks.1.attentions.0:3``, where the
module path is the ``Attention`` module's name in ``model.named_modules()``. The same string is
used in CLI options, tables and JSON. Layers may have different head counts.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from diffcircuit.errors import ConfigError, ModelError

__all__ = ["HeadAddress", "HeadRegistry", "LayerInfo", "attention_modules", "layer_kind"]


_FLOW_ORDER = ("down_blocks.", "mid_block.", "up_blocks.")


def _flow_rank(name: str) -> int:
    """UNet data-flow order (down, mid, up); other layouts keep their module order."""
    return next(
        (i for i, prefix in enumerate(_FLOW_ORDER) if name.startswith(prefix)), len(_FLOW_ORDER)
    )


def attention_modules(model: torch.nn.Module) -> list[tuple[str, Any]]:
    """Every diffusers attention module (``Attention``, or another with the attention mixin and a processor, such
    as ``FluxAttention``) of ``model`` with its module path, in data-flow order.

    (``UNet2DModel`` registers ``mid_block`` after ``up_blocks``; sorting puts it between.)
    """
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention

    found: list[tuple[str, Any]] = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, (Attention, AttentionModuleMixin))
        and hasattr(m, "processor")
        and hasattr(m, "to_q")
    ]
    return sorted(found, key=lambda item: _flow_rank(item[0]))  # stable: module order within a rank


def layer_kind(module: torch.nn.Module) -> str:
    """``"joint"`` (MMDiT-style: text and image tokens attend together), ``"cross"`` or ``"self"``."""
    if getattr(module, "add_q_proj", None) is not None:
        return "joint"
    if (
        type(module).__name__ == "FluxAttention"
    ):  # Flux's single-stream blocks: one [text | image] sequence
        return "joint"
    return "cross" if getattr(module, "is_cross_attention", False) else "self"


@dataclass(frozen=True, kw_only=True)
class LayerInfo:
    """An attention layer: its address, head count and geometry."""

    layer: str
    heads: int
    head_dim: int
    kind: str
    query_grid: tuple[int, int] | None = None  # (height, width) of the query positions
    n_keys: int | None = None  # keys each query attends over

    def to_dict(self) -> dict:
        grid = list(self.query_grid) if self.query_grid else None
        return dict(
            layer=self.layer,
            heads=self.heads,
            head_dim=self.head_dim,
            kind=self.kind,
            query_grid=grid,
            n_keys=self.n_keys,
        )


@dataclass(frozen=True, kw_only=True, order=True)
class HeadAddress:
    """One head: ``layer`` is the Attention module path, ``head`` its index in that layer."""

    layer: str
    head: int

    def __str__(self) -> str:
        return f"{self.layer}:{self.head}"


class HeadRegistry:
    """The model's attention layers and heads, addressable by string."""

    def __init__(self, layers: Iterable[LayerInfo]):
        self.layers = tuple(layers)
        self._by_name = {info.layer: info for info in self.layers}

    @classmethod
    def from_model(
        cls,
        model: torch.nn.Module,
        *,
        geometry: dict[str, tuple[tuple[int, int] | None, int]] | None = None,
    ):
        """Registry of ``model``'s heads; ``geometry`` maps layer -> (query grid, n_keys) when known."""
        geometry = geometry or {}
        layers = []
        for name, module in attention_modules(model):
            grid, n_keys = geometry.get(name, (None, None))
            layers.append(
                LayerInfo(
                    layer=name,
                    heads=int(module.heads),
                    head_dim=int(module.inner_dim) // int(module.heads),
                    kind=layer_kind(module),
                    query_grid=grid,
                    n_keys=n_keys,
                )
            )
        if not layers:
            raise ModelError(
                f"{type(model).__name__} has no diffusers Attention modules to analyse"
            )
        return cls(layers)

    def __len__(self) -> int:
        return sum(info.heads for info in self.layers)

    def __iter__(self) -> Iterator[HeadAddress]:
        for info in self.layers:
            for h in range(info.heads):
                yield HeadAddress(layer=info.layer, head=h)

    def layer(self, name: str) -> LayerInfo:
        try:
            return self._by_name[name]
        except KeyError:
            raise ConfigError(
                f"no attention layer {name!r}; `diffcircuit info` lists them"
            ) from None

    def parse(self, address: str | HeadAddress) -> HeadAddress:
        """A validated ``HeadAddress`` from ``"<layer>:<head>"``."""
        if isinstance(address, HeadAddress):
            layer, head = address.layer, address.head
        else:
            layer, sep, head_text = str(address).rpartition(":")
            if not sep or not head_text.isdigit():
                raise ConfigError(
                    f"head address {address!r} is not of the form '<layer>:<head index>'"
                )
            head = int(head_text)
        info = self.layer(layer)
        if not 0 <= head < info.heads:
            raise ConfigError(f"layer {layer!r} has heads 0..{info.heads - 1}, not {head}")
        return HeadAddress(layer=layer, head=head)
