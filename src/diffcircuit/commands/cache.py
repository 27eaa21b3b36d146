"""``diffcircuit cache``: every head's output (before ``to_out``) spilled to disk as safetensors shards, batch by
batch (``protocol.activations``), for analyses that need the activations themselves."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from diffcircuit.errors import ConfigError, InputError
from diffcircuit.models.spec import MODEL_HELP, ModelSpec
from diffcircuit.protocol.activations import ActivationCache, cache_activations
from diffcircuit.protocol.setup import build_setup, one_set
from diffcircuit.protocol.store import check_writable

__all__ = ["CACHE_HELP", "CacheConfig", "run_cache"]


@dataclass(frozen=True, kw_only=True)
class CacheConfig(ModelSpec):
    """The model (``ModelSpec``'s fields), one dataset, the timesteps and layers whose heads are cached."""

    data: str = "faces"
    n: int = 16
    timesteps: tuple[int, ...] = (500,)
    layers: tuple[str, ...] = ()  # attention layers (default: all)
    batch_size: int = 50  # images per forward and per shard file
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        if self.n < 1 or self.batch_size < 1 or not self.timesteps:
            raise ConfigError(
                "need n >= 1, batch_size >= 1 and at least one timestep in timesteps",
                "n",
                "batch_size",
                "timesteps",
            )


# each CacheConfig field in a line: the help of the flag that sets it (``diffcircuit cache``)
CACHE_HELP = MODEL_HELP | {
    "data": "'synthetic', 'faces', 'nonfaces' or a folder",
    "n": "images cached",
    "timesteps": "comma-separated timesteps",
    "layers": "an attention layer (repeatable; none: all)",
    "batch_size": "images per forward and per shard file",
    "seed": "noise seed; same seed, same results",
}


def run_cache(
    cfg: CacheConfig, out_dir: str | Path, *, progress: Callable[[int], None] | None = None
) -> ActivationCache:
    """Write the cache into the new directory ``out_dir``."""
    out = Path(out_dir)
    if out.exists():
        raise InputError(f"{out} exists; the cache goes into a new directory")
    check_writable(out)
    setup = build_setup(
        cfg, timesteps=cfg.timesteps, images=one_set("a", cfg.data, n=cfg.n, seed=cfg.seed)
    )
    chosen = [setup.registry.layer(name).layer for name in cfg.layers] or None
    with setup.autocast():
        return cache_activations(
            setup.den,
            setup.sets["a"].images,
            out,
            timesteps=cfg.timesteps,
            layers=chosen,
            seed=cfg.seed,
            batch_size=cfg.batch_size,
            registry=setup.registry,
            progress=progress,
        )
