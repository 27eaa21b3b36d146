"""An activation cache that spills to disk: every head's output, per batch, as safetensors shards.

``cache_activations`` noises the images as everywhere else (per-image seeded noise), runs one
forward per batch and timestep with the chosen layers' per-head outputs recorded (before ``to_out``
mixes heads: ``[batch, heads, queries, head_dim]``), and writes each batch as one safetensors file
(tensor names ``<layer>``, plus ``images``: their dataset indices), atomically. Memory holds one
batch. ``ActivationCache`` reads a layer back lazily (safetensors maps the file; only the asked
tensor is read), for all images or a slice, so caches far larger than memory stay usable.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from diffcircuit.errors import InputError
from diffcircuit.instrument.registry import HeadRegistry
from diffcircuit.instrument.session import instrument, probe_registry
from diffcircuit.models.noise import noisy_batches
from diffcircuit.protocol.store import atomic_write_bytes, write_json

__all__ = ["ActivationCache", "cache_activations"]


class ActivationCache:
    """A cache directory written by ``cache_activations``: ``index.json`` and one file per batch x timestep."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.index = json.loads((self.root / "index.json").read_text())

    @property
    def layers(self) -> list[str]:
        return list(self.index["layers"])

    def files(self, timestep: int) -> list[Path]:
        return [self.root / f for f in self.index["files"][str(timestep)]]

    def layer(self, layer: str, timestep: int, images: slice | None = None) -> torch.Tensor:
        """``[n, heads, queries, head_dim]`` of ``layer`` at ``timestep`` (rows: images in order, or a slice)."""
        from safetensors import safe_open

        if layer not in self.index["layers"]:
            raise InputError(
                f"{layer!r} is not cached here; cached layers: {', '.join(self.index['layers'])}"
            )
        lo, hi, _ = (images or slice(None)).indices(int(self.index["n"]))
        parts = []
        for path in self.files(timestep):
            with safe_open(str(path), framework="pt") as f:
                ids = f.get_tensor("images")
                keep = (ids >= lo) & (ids < hi)
                if keep.any():
                    parts.append(
                        f.get_slice(layer)[int(keep.nonzero()[0]) : int(keep.nonzero()[-1]) + 1]
                    )
        return torch.cat(parts) if parts else torch.empty(0)


@torch.no_grad()
def cache_activations(
    denoiser,
    images,
    out_dir: str | Path,
    *,
    timesteps: Sequence[int],
    layers: Sequence[str] | None = None,
    seed: int = 0,
    dataset: str = "a",
    batch_size: int = 50,
    registry: HeadRegistry | None = None,
    dtype: torch.dtype = torch.float32,
    progress: Callable[[int], None] | None = None,
) -> ActivationCache:
    """Write every chosen layer's per-head output for ``images`` at ``timesteps`` under ``out_dir``."""
    from safetensors.torch import save

    out, n = Path(out_dir), len(images)
    registry = registry or probe_registry(
        denoiser, torch.from_numpy(np.asarray(images[:1], dtype=np.float32))
    )
    layers = [registry.layer(name).layer for name in (layers or [i.layer for i in registry.layers])]
    files: dict[str, list[str]] = {}
    for batch in noisy_batches(
        denoiser, images, timesteps=timesteps, seed=seed, dataset=dataset, batch_size=batch_size
    ):
        with instrument(denoiser, registry=registry, cache_heads=layers) as session:
            denoiser.predict(batch.x_t, batch.t, rows=batch.which)
        cached = session.pop("head_out")
        tensors = {layer: cached[layer].to(dtype).contiguous() for layer in layers}
        tensors["images"] = torch.from_numpy(batch.rows)
        name = f"{dataset}_t{batch.timestep}_{int(batch.rows[0]):07d}.safetensors"
        atomic_write_bytes(out / name, save(tensors))
        files.setdefault(str(batch.timestep), []).append(name)
        if progress is not None:
            progress(len(batch.rows))
    write_json(
        out / "index.json",
        {
            "n": n,
            "dataset": dataset,
            "seed": seed,
            "timesteps": list(map(int, timesteps)),
            "layers": layers,
            "dtype": str(dtype).removeprefix("torch."),
            "files": files,
        },
    )
    return ActivationCache(out)
