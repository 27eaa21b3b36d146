"""Data specs: ``synthetic``, ``faces``, ``nonfaces`` or a folder path, resolved to an image set."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffcircuit.data.faces import LFW_FACES, lfw_images
from diffcircuit.data.folder import folder_images
from diffcircuit.data.synthetic import synthetic_images
from diffcircuit.errors import DiffcircuitError

__all__ = ["BUILTIN_SPECS", "ImageSet", "load_images"]

BUILTIN_SPECS = ("synthetic", "faces", "nonfaces")


@dataclass(frozen=True, kw_only=True, eq=False)
class ImageSet:
    """Images ``[n, channels, size, size]`` in [-1, 1], with where they came from."""

    spec: str
    images: np.ndarray
    names: tuple[str, ...]  # one label per image: its index or its path in the folder
    masks: np.ndarray | None = None  # [n, size, size] object masks (synthetic only)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the prepared pixels: two runs saw the same data iff these match."""
        return hashlib.sha256(np.ascontiguousarray(self.images).tobytes()).hexdigest()[:16]


def load_images(spec: str, *, n: int, size: int, channels: int, seed: int = 0, skip_bad: bool = False) -> ImageSet:
    """Resolve a data spec to ``n`` prepared images."""
    if n < 1:
        raise DiffcircuitError(f"need at least one image, not n={n}")
    if spec == "synthetic":
        images, masks, _ = synthetic_images(n, size=size, channels=channels, seed=seed)
        return ImageSet(spec=spec, images=images, names=tuple(str(i) for i in range(n)), masks=masks)
    if spec in ("faces", "nonfaces"):
        if n > LFW_FACES:
            raise DiffcircuitError(f"'{spec}' has {LFW_FACES} images (LFW subset); ask for --n {LFW_FACES} or fewer, or give an image folder")
        images = lfw_images(spec, size=size, channels=channels)[:n]
        return ImageSet(spec=spec, images=images, names=tuple(str(i) for i in range(n)))
    folder = Path(spec).expanduser()
    if not folder.is_dir():
        raise DiffcircuitError(f"data spec {spec!r} is not one of {', '.join(BUILTIN_SPECS)} nor an existing folder")
    images, names = folder_images(folder, n=n, size=size, channels=channels, skip_bad=skip_bad)
    return ImageSet(spec=str(folder), images=images, names=tuple(names))
