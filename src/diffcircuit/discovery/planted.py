"""Planted ground truth (as InterpBench does for language models): edit a copy of a model so that
some heads are known to be dead, one is known to be essential and two are known to be redundant,
then check discovery against it.

- a *dead* head has its output-projection columns zeroed: it cannot affect anything;
- the *essential* head is the only live head of a layer whose removal matters (every other head of
  that layer is made dead), so the layer's whole contribution flows through it;
- a *redundant pair* (a, b) of one layer: head b is overwritten with a copy of head a (its query,
  key and value rows and its output-projection columns) and both output columns are halved, so
  the layer computes exactly what it did with head a alone (and head b's own function is gone).
  Ablating both removes head a's contribution; ablating either alone removes only half of it, which
  costs much less than all of it (about a quarter where the loss is locally quadratic). Whether a
  given τ lets either alone go but not both is measured, not assumed (see the tests).

Planted attention (``forcing``): chosen heads attend by a known rule whenever diffcircuit instruments the
network — from every query, with logits ``pattern(features)`` of each key's clean-image probe features
(``metrics.probes``): the highest-gradient keys (``edge_logits``), the highest-texture keys
(``texture_logits``), the grid's centre whatever the image holds (``centre_logits``, a positional head), or
at random (``random_logits``). The role null must call the first an edge head on any images and the others
no content head.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from diffcircuit.errors import ConfigError
from diffcircuit.instrument.processor import InstrumentedAttnProcessor
from diffcircuit.instrument.registry import attention_modules
from diffcircuit.metrics.probes import PROBE_CHANNELS

__all__ = [
    "PlantedModel",
    "centre_logits",
    "duplicate_head",
    "edge_logits",
    "forcing",
    "plant",
    "random_logits",
    "texture_logits",
    "zero_heads",
]


def _head_slice(attn, head: int) -> slice:
    d = (
        attn.inner_dim // attn.heads
    )  # head dimension: heads are consecutive d-row blocks of to_q/to_k/to_v
    return slice(head * d, (head + 1) * d)


def zero_heads(net: torch.nn.Module, addresses: Sequence[str]) -> None:
    """Zero the output-projection columns of each ``layer:head`` in place."""
    layers = dict(attention_modules(net))
    with torch.no_grad():
        for address in addresses:
            layer, head = address.rsplit(":", 1)
            attn = layers[layer]
            attn.to_out[0].weight[:, _head_slice(attn, int(head))] = 0


def duplicate_head(net: torch.nn.Module, layer: str, source: int, target: int) -> None:
    """In place: head ``target`` of ``layer`` becomes a copy of head ``source`` and both outputs are halved."""
    attn = dict(attention_modules(net))[layer]
    if attn.is_cross_attention or getattr(attn, "norm_q", None) is not None or source == target:
        raise ConfigError(
            "duplicate_head needs two different heads of a self-attention layer without q/k norms"
        )
    s, t = _head_slice(attn, source), _head_slice(attn, target)
    with torch.no_grad():
        for linear in (
            attn.to_q,
            attn.to_k,
            attn.to_v,
        ):  # weight: [inner_dim, query_dim]; rows are per head
            linear.weight[t] = linear.weight[s]
            if linear.bias is not None:
                linear.bias[t] = linear.bias[s]
        out = attn.to_out[0].weight  # [query_dim, inner_dim]; columns are per head
        out[:, s] *= 0.5
        out[:, t] = out[:, s]


@dataclass(frozen=True)
class PlantedModel:
    network: torch.nn.Module
    dead: tuple[str, ...]
    essential: str | None
    redundant: tuple[str, str] | None = None


def plant(
    net: torch.nn.Module,
    *,
    dead: Sequence[str],
    essential_layer: str | None = None,
    essential_head: int = 0,
    redundant: tuple[str, int, int] | None = None,
) -> PlantedModel:
    """A copy of ``net`` with ``dead`` heads (outside the essential layer and the redundant pair), the
    essential head (with ``essential_layer``) and, with ``redundant`` = (layer, a, b), head b made a
    duplicate of head a."""
    planted = copy.deepcopy(net)
    pair = (
        ()
        if redundant is None
        else (f"{redundant[0]}:{redundant[1]}", f"{redundant[0]}:{redundant[2]}")
    )
    if redundant is not None and redundant[0] == essential_layer:
        raise ConfigError(
            "the redundant pair must lie outside the essential layer (whose other heads are dead)"
        )
    silenced = []
    if essential_layer is not None:
        heads = dict(attention_modules(planted))[essential_layer].heads
        silenced = [f"{essential_layer}:{h}" for h in range(heads) if h != essential_head]
    dead = tuple(
        a
        for a in dead
        if a not in pair and (essential_layer is None or not a.startswith(essential_layer + ":"))
    )
    zero_heads(planted, [*dead, *silenced])
    if redundant is not None:
        duplicate_head(planted, *redundant)
    return PlantedModel(
        network=planted,
        dead=dead,
        essential=None if essential_layer is None else f"{essential_layer}:{essential_head}",
        redundant=pair or None,
    )


def edge_logits(feats: torch.Tensor, generator=None) -> torch.Tensor:
    """Nearly all mass on each image's highest-gradient keys: features [B, K, C] -> logits [B, K]."""
    edge = feats[..., PROBE_CHANNELS.index("edge")]
    return 40 * edge / edge.amax(-1, keepdim=True).clamp_min(1e-8)


def texture_logits(feats: torch.Tensor, generator=None) -> torch.Tensor:
    """Nearly all mass on the keys of highest local high-frequency energy."""
    tex = feats[..., PROBE_CHANNELS.index("texture")]
    return 40 * tex / tex.amax(-1, keepdim=True).clamp_min(1e-12)


def centre_logits(feats: torch.Tensor, generator=None) -> torch.Tensor:
    """A positional head: attention decays with the key's squared distance from the grid's centre."""
    return -feats[..., PROBE_CHANNELS.index("r2")]


def random_logits(feats: torch.Tensor, generator=None) -> torch.Tensor:
    """Logits drawn at random for every image and key, whatever the image holds."""
    return 2 * torch.randn(feats.shape[:2], generator=generator)


Pattern = Callable[[torch.Tensor, torch.Generator | None], torch.Tensor]


def _forced_processor(pattern: Pattern, heads: dict[str, list[int]], generator):
    class Forced(InstrumentedAttnProcessor):
        def _attend(self, query, key, value, mask, shape):
            chosen = heads.get(self.layer, [])
            feats = (
                self.session.features_for(shape, key.shape[2]) if chosen else None
            )  # [B, K, C] or None
            if feats is not None:
                scale = query.shape[-1] ** -0.5
                query, key = query.clone(), key.clone()
                for h in chosen:  # q·k·scale = the key's logit, from every query
                    query[:, h] = 0
                    query[:, h, :, 0] = 1
                    key[:, h] = 0
                    key[:, h, :, 0] = pattern(feats.float().cpu(), generator).to(key) / scale
            return super()._attend(query, key, value, mask, shape)

    return Forced


@contextmanager
def forcing(
    network: torch.nn.Module,
    pattern: Pattern,
    heads: dict[str, list[int]],
    generator: torch.Generator | None = None,
) -> Iterator[None]:
    """Inside: ``network``'s heads ``{layer: [head, ...]}`` attend by ``pattern`` whenever it is instrumented with
    key features (an observation); the original processors are restored on exit."""
    cls = _forced_processor(pattern, heads, generator)
    modules = list(attention_modules(network))
    originals = [m.processor for _, m in modules]
    try:
        for name, module in modules:
            module.set_processor(cls(name, None))
        yield
    finally:
        for (_, module), original in zip(modules, originals):
            module.set_processor(original)
