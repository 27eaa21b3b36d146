"""What an analysis cost: forward passes through the network, images through them, and seconds.

Every forward ends in the network's output head (the last module diffusers registers that holds
weights: ``conv_out`` of a UNet, ``proj_out`` of a transformer), full forwards and the partial ones
of prefix reuse (``interventions.prefix``) alike, so counting passes through that head counts both.
The counting hook lives only inside ``count_forwards`` and is removed in ``finally``: outside it
the network carries nothing of diffcircuit's.

    with count_forwards(den.network) as cost:
        ...                                   # any analysis
    cost.forward_calls, cost.image_forwards, cost.seconds
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch

from diffcircuit.errors import ConfigError

__all__ = ["Cost", "count_forwards", "output_head"]


@dataclass
class Cost:
    """Forward passes (full or partial), images through them, and wall-clock seconds."""

    forward_calls: int = 0
    image_forwards: int = 0
    seconds: float = 0.0

    def __add__(self, other: Cost) -> Cost:
        return Cost(
            self.forward_calls + other.forward_calls,
            self.image_forwards + other.image_forwards,
            self.seconds + other.seconds,
        )

    def to_dict(self) -> dict:
        return asdict(self) | {"seconds": round(self.seconds, 3)}


def output_head(network: torch.nn.Module) -> torch.nn.Module:
    """The last weight-holding module the network registers: the one every forward ends in."""
    last = None
    for module in network.modules():
        if any(True for _ in module.parameters(recurse=False)):
            last = module
    if last is None:
        raise ConfigError(f"{type(network).__name__} has no weights to count forwards through")
    return last


@contextmanager
def count_forwards(network: torch.nn.Module) -> Iterator[Cost]:
    """Count the forwards through ``network`` (and the images in them) inside the ``with`` block."""
    cost = Cost()

    def hook(module, args):
        cost.forward_calls += 1
        cost.image_forwards += (
            int(args[0].shape[0]) if args and isinstance(args[0], torch.Tensor) else 0
        )

    handle = output_head(network).register_forward_pre_hook(hook)
    start = time.perf_counter()
    try:
        yield cost
    finally:
        cost.seconds = time.perf_counter() - start
        handle.remove()
