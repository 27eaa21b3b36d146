"""Ablation of heads, attention layers, blocks and ResNet blocks, and the degradation it causes.

Targets (``Target.level``):

- ``head``: one head's slice of the attention output, before the output projection mixes heads;
- ``layer``: every head of one attention layer (the output projection's bias and the residual
  connection remain, so the layer then adds only a constant);
- ``block``: every head of every attention layer in one UNet block (``down_blocks.1``, ``mid_block``…);
- ``all``: every head of the network at once (``all_heads``): the joint ablation that integrated
  gradients along the all-heads path estimates;
- ``resnet``: one ResNet block's residual branch r, in out = (shortcut(x) + r) / output_scale_factor;
- ``token``: one prompt token (key ``j`` of every cross-attention head, or text key ``j`` of every joint one),
  named ``token:j``: removed from every such softmax (zero ablation only; equal to dropping it from the
  prompt's embeddings — in joint attention too, where nothing then reads the token's own stream);
  ``token:j*w`` instead multiplies the token's attention by w ≥ 0 and renormalises (reweighting;
  rows say method ``reweight``); ``token:j@<layer>`` or ``token:j*w@<layer>:<head>`` acts in those heads only;
- ``random``: a set of heads drawn at random (``random_head_sets``), the null control for a
  component of the same number of heads.

Targets that name the same heads (a block holding one attention layer *is* that layer) are one
intervention: ``distinct_targets`` keeps the first and lists the others as its aliases.

Methods, applied to the targeted activation a (a head slice ``[q_pos, d]`` or a residual branch):

- ``zero``: a := 0;
- ``mean``: a := its mean over the reference images, position by position, at the same timestep;
- ``resample``: a := its value on another image (image i takes image i+1's, cyclically, of the same
  batch; or, with ``source`` images, the source image of the same index — e.g. the other dataset);
- ``noise``: a := mean + std · z, z ~ N(0, 1), with the reference mean and standard deviation per
  position and channel (a Gaussian with the activation's own first two moments).

Degradation is measured on the *same* noisy inputs, clean vs intervened (paired):
``degradation_pct = 100 · (mse_intervened − mse_clean) / mse_clean`` on the ε-prediction, with the
implied x₀ error next to it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from diffcircuit.errors import ConfigError, ModelError
from diffcircuit.instrument.registry import HeadAddress, HeadRegistry

__all__ = [
    "LEVELS",
    "METHODS",
    "Target",
    "distinct_targets",
    "random_head_sets",
    "resnet_blocks",
    "resnet_intervention",
    "targets",
    "token_target",
]

LEVELS = ("head", "layer", "block", "all", "resnet", "token")
METHODS = ("zero", "mean", "resample", "noise")


@dataclass(frozen=True, kw_only=True)
class Target:
    """What an ablation removes: ``name`` is a head address, layer path, block name or ResNet path."""

    level: str
    name: str
    heads: tuple[HeadAddress, ...] = ()
    weight: float = 0.0  # token targets: the factor on the token's attention (0 removes it)

    @property
    def token(self) -> int | None:
        return (
            int(self.name.removeprefix("token:").split("@")[0].split("*")[0])
            if self.level == "token"
            else None
        )

    @property
    def layer(self) -> str | None:
        return self.heads[0].layer if self.level in ("head", "layer") else None

    @property
    def head(self) -> int | None:
        return self.heads[0].head if self.level == "head" else None


def _block_of(layer: str) -> str:
    parts = layer.split(".")
    return ".".join(parts[:2]) if parts[0] in ("down_blocks", "up_blocks") else parts[0]


def resnet_blocks(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    from diffusers.models.resnet import ResnetBlock2D

    return [(name, m) for name, m in model.named_modules() if isinstance(m, ResnetBlock2D)]


def token_target(registry: HeadRegistry, name: str, n_tokens: int) -> Target | None:
    """The target ``token:J`` (removal) or ``token:J*W`` (attention to token J times W) in every cross- and
    joint-attention head, or with ``@WHERE`` only in the heads of one layer (``@<layer>``) or one head
    (``@<layer>:<head>``); None when ``name`` is not of that form, J is not a prompt token or WHERE has none."""
    body, _, where = name.removeprefix("token:").partition("@")
    index, _, weight = body.partition("*")
    try:
        j, w = int(index), float(weight) if weight else 0.0
    except ValueError:
        return None
    heads = tuple(
        a
        for a in registry
        if registry.layer(a.layer).kind in ("cross", "joint")
        and (not where or where in (a.layer, str(a)))
    )
    if (
        not name.startswith("token:")
        or not heads
        or not 0 <= j < n_tokens
        or not w >= 0
        or w == float("inf")
    ):
        return None
    label = f"token:{j}" + (f"*{w:g}" if w else "") + (f"@{where}" if where else "")
    return Target(level="token", name=label, heads=heads, weight=w)


def targets(
    registry: HeadRegistry,
    level: str,
    model: torch.nn.Module | None = None,
    tokens: tuple[str, ...] = (),
    token_weight: float = 0.0,
) -> list[Target]:
    """Every target of one level, in data-flow order (``tokens``: the prompt's tokens, for level ``token``,
    each removed, or reweighted by ``token_weight``)."""
    if level == "head":
        return [Target(level="head", name=str(a), heads=(a,)) for a in registry]
    if level == "layer":
        return [
            Target(
                level="layer", name=i.layer, heads=tuple(a for a in registry if a.layer == i.layer)
            )
            for i in registry.layers
        ]
    if level == "block":
        blocks = list(dict.fromkeys(_block_of(i.layer) for i in registry.layers))
        return [
            Target(
                level="block", name=b, heads=tuple(a for a in registry if _block_of(a.layer) == b)
            )
            for b in blocks
        ]
    if level == "all":
        return [Target(level="all", name="all_heads", heads=tuple(registry))]
    if level == "resnet":
        if model is None:
            raise ConfigError("resnet targets need the model")
        return [Target(level="resnet", name=name) for name, _ in resnet_blocks(model)]
    if level == "token":
        suffix = f"*{token_weight:g}" if token_weight else ""
        found = [
            token_target(registry, f"token:{j}{suffix}", len(tokens))
            for j, name in enumerate(tokens)
            if name is not None
        ]  # padding positions are keys too, but no word
        return [t for t in found if t is not None]
    raise ConfigError(f"unknown ablation level {level!r}; choose from {', '.join(LEVELS)}")


def distinct_targets(named: list[Target]) -> tuple[list[Target], dict[str, tuple[str, ...]]]:
    """``named`` without the head-set targets that repeat an earlier one's heads, and per kept target
    the names of those it stands for (e.g. ``{"down_blocks.1.attentions.0": ("down_blocks.1",)}``)."""
    kept, first, aliases = [], {}, {}
    for target in named:
        key = frozenset(target.heads) if target.level in ("head", "layer", "block") else None
        if key is not None and key in first:
            aliases.setdefault(first[key], []).append(target.name)
            continue
        if key is not None:
            first[key] = target.name
        kept.append(target)
    return kept, {name: tuple(names) for name, names in aliases.items()}


def random_head_sets(
    registry: HeadRegistry, size: int, count: int, *, seed: int = 0
) -> list[Target]:
    """``count`` sets of ``size`` heads drawn uniformly without replacement from all heads (the null control)."""
    heads = list(registry)
    if not 1 <= size <= len(heads):
        raise ConfigError(f"a random set needs 1..{len(heads)} heads, not {size}")
    rng = np.random.default_rng([seed, size])
    return [
        Target(
            level="random",
            name=f"random{size}.{r}",
            heads=tuple(sorted(heads[i] for i in rng.choice(len(heads), size, replace=False))),
        )
        for r in range(count)
    ]


@contextmanager
def resnet_intervention(
    module: torch.nn.Module, *, replace=None, record: list | None = None
) -> Iterator[None]:
    """Hook one ResNet block: ``record`` collects its residual branch r; ``replace(r) -> r'`` swaps it."""
    if (
        getattr(module, "upsample", None) is not None
        or getattr(module, "downsample", None) is not None
    ):
        raise ModelError("ResNet blocks that resample internally cannot be ablated yet")

    def hook(mod, args, output):
        x = args[0]
        shortcut = mod.conv_shortcut(x) if mod.conv_shortcut is not None else x
        branch = output * mod.output_scale_factor - shortcut  # r  [batch, channels, h, w]
        if record is not None:
            record.append(branch.detach())
        if replace is None:
            return output
        return (shortcut + replace(branch)) / mod.output_scale_factor

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
