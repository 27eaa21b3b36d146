"""Heads by address, the instrumented processors, and hooks: capture and intervene inside a ``with`` block."""

from diffcircuit.instrument import hooks
from diffcircuit.instrument.hooks import HookContext
from diffcircuit.instrument.registry import HeadAddress, HeadRegistry, attention_modules
from diffcircuit.instrument.session import instrument, probe_registry

__all__ = [
    "HeadAddress",
    "HeadRegistry",
    "HookContext",
    "attention_modules",
    "hooks",
    "instrument",
    "probe_registry",
]
