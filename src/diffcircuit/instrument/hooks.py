"""Hooks, the extension point, and their factories: small interventions for ``instrument(..., hooks={address: fn})``.

The session's own keyword interventions (``zero_heads``, ``patches``, ``scales``) are these same factories
(``replace``, ``scale``) registered before the user's hooks.

A hook is ``fn(value, ctx) -> replacement or None``. At a head address (``layer:head``) ``value`` is that
head's output slice before the output projection mixes heads, ``[batch, q_pos, head_dim]``; at a layer
address every head's, ``[batch, heads, q_pos, head_dim]``. ``ctx`` (``HookContext``) gives the address,
layer, head and the number of rows. Returning None leaves the value alone (a recording hook)::

    import diffcircuit as dc
    with dc.instrument(den.network, hooks={"mid_block.attentions.0:3": dc.hooks.scale(2.0)}):
        eps_hat = den.predict_eps(x_t, t)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from diffcircuit.errors import ConfigError

__all__ = ["Hook", "HookContext", "cache", "replace", "rows_where", "scale", "shift", "zero"]


@dataclass(frozen=True)
class HookContext:
    """What a hook is told: the address it was registered at, its layer and head (None for a layer hook), and
    the number of rows in this forward (images, or images x variants of a stacked intervention)."""

    address: str
    layer: str
    head: int | None
    batch: int


Hook = Callable[[torch.Tensor, HookContext], "torch.Tensor | None"]


def zero() -> Hook:
    """Zero ablation: the value becomes 0."""
    return lambda value, ctx: torch.zeros_like(value)


def scale(factor: float) -> Hook:
    """The value times ``factor`` (2.0 doubles a head's contribution, 0.0 is zero ablation)."""
    return lambda value, ctx: value * factor


def shift(delta: torch.Tensor | float) -> Hook:
    """The value plus ``delta`` (broadcastable to it): steering along a direction."""
    return lambda value, ctx: value + torch.as_tensor(delta).to(value)


def replace(with_value: torch.Tensor | float) -> Hook:
    """The value replaced by ``with_value`` broadcast to it: mean ablation with a head's mean ``[q_pos, d]``,
    activation patching with another image's ``[batch, q_pos, d]``."""
    return lambda value, ctx: torch.as_tensor(with_value).to(value).expand_as(value)


def cache(store: list) -> Hook:
    """Append a detached copy of the value to ``store``; the value is left alone."""

    def hook(value: torch.Tensor, ctx: HookContext) -> None:
        store.append(value.detach())

    return hook


def rows_where(mask: torch.Tensor, with_value: torch.Tensor | float) -> Hook:
    """For a layer address, in a forward that stacks several variants along the batch: the heads of each row
    where ``mask`` ``[rows, heads]`` is True get ``with_value`` (0, or the heads' means ``[heads, q_pos, d]``, or
    anything broadcastable to ``[rows, heads, q_pos, d]``); the other rows and heads keep their value."""

    def hook(value: torch.Tensor, ctx: HookContext) -> torch.Tensor:
        if mask.shape != value.shape[:2]:
            raise ConfigError(
                f"{ctx.address}: mask {list(mask.shape)} does not match rows x heads {list(value.shape[:2])}"
            )
        return torch.where(
            mask.to(value.device)[:, :, None, None], torch.as_tensor(with_value).to(value), value
        )

    return hook
