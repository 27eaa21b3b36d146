"""Data specs: ``synthetic``, ``faces``, ``nonfaces`` or a folder path, resolved to an image set.

Synthetic images are made slice by slice when asked for (``LazyImages``): image ``i`` depends on
``(seed, i)`` alone, so a run over 100,000 of them never holds them all in memory.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffcircuit.data.captions import captions_for
from diffcircuit.data.faces import LFW_FACES, lfw_images
from diffcircuit.data.folder import folder_images
from diffcircuit.data.synthetic import synthetic_images
from diffcircuit.errors import DiffcircuitError

__all__ = ["BUILTIN_SPECS", "ImageSet", "LazyImages", "load_images"]

BUILTIN_SPECS = ("synthetic", "faces", "nonfaces")


class LazyImages:
    """An array ``[n, *item_shape]`` whose slices are computed when asked for (``load(lo, hi)``).

    Slicing with step 1 gives a NumPy array of just that slice (made in one call); other slices and
    integer arrays pick rows one by one; ``np.asarray`` gives the whole array.
    """

    def __init__(self, n: int, item_shape: tuple[int, ...], dtype, load: Callable[[int, int], np.ndarray]):
        self._n, self._item_shape, self.dtype, self._load = n, tuple(item_shape), np.dtype(dtype), load

    def __len__(self) -> int:
        return self._n

    @property
    def shape(self) -> tuple[int, ...]:
        return (self._n, *self._item_shape)

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            i = int(key) + (self._n if key < 0 else 0)
            if not 0 <= i < self._n:
                raise IndexError(f"index {key} out of range for {self._n} images")
            return self._load(i, i + 1)[0]
        if isinstance(key, slice) and key.step in (None, 1):
            lo, hi, _ = key.indices(self._n)
            return self._load(lo, max(lo, hi))
        if isinstance(key, slice):
            lo, hi, step = key.indices(self._n)
            key = np.arange(lo, hi, step)
        index = np.asarray(key)
        if index.dtype.kind in "iu" and index.ndim == 1:  # fancy indexing (resampling): row by row
            return np.stack([self[int(i)] for i in index]) if len(index) else self._load(0, 0)
        raise TypeError("lazy images take integer indices, slices and 1-D integer arrays")

    def __array__(self, dtype=None, copy=None):
        whole = self[:]
        return whole if dtype is None else whole.astype(dtype)

    def chunks(self, size: int = 256) -> Iterator[np.ndarray]:
        for lo in range(0, self._n, size):
            yield self[lo:lo + size]


class _SyntheticSource:
    """Synthetic images and masks by slice; the last slice is kept, since images and masks are asked in pairs."""

    def __init__(self, size: int, channels: int, seed: int):
        self.size, self.channels, self.seed, self._last = size, channels, seed, None

    def __call__(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        if self._last is None or self._last[0] != (lo, hi):
            images, masks, _ = synthetic_images(hi - lo, size=self.size, channels=self.channels, seed=self.seed, start=lo)
            self._last = ((lo, hi), (images, masks))
        return self._last[1]


@dataclass(frozen=True, kw_only=True, eq=False)
class ImageSet:
    """Images ``[n, channels, size, size]`` in [-1, 1], with where they came from. For a latent model,
    ``images`` are the autoencoder's latents (what the network sees) and ``pixels`` the images they encode."""

    spec: str
    images: np.ndarray | LazyImages
    names: tuple[str, ...]  # one label per image: its index or its path in the folder
    masks: np.ndarray | LazyImages | None = None  # [n, size, size] object masks (synthetic only), in pixels
    pixels: np.ndarray | LazyImages | None = None  # latent models: the images ``images`` encode
    captions: tuple[str, ...] | None = None  # one prompt per image (an image folder's captions.csv / .jsonl)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def pictures(self) -> np.ndarray | LazyImages:
        """The images as pixels (what probes and figures look at): ``pixels`` for a latent model, else ``images``."""
        return self.images if self.pixels is None else self.pixels

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the prepared pixels (and captions): two runs saw the same data iff these match."""
        digest = hashlib.sha256()
        chunks = self.pictures.chunks() if isinstance(self.pictures, LazyImages) else [self.pictures]
        for chunk in chunks:
            digest.update(np.ascontiguousarray(chunk).tobytes())
        for caption in self.captions or ():
            digest.update(caption.encode() + b"\0")
        return digest.hexdigest()[:16]


def load_images(spec: str, *, n: int, size: int, channels: int, seed: int = 0, skip_bad: bool = False) -> ImageSet:
    """Resolve a data spec to ``n`` prepared images."""
    if n < 1:
        raise DiffcircuitError(f"need at least one image, not n={n}")
    if spec == "synthetic":
        source = _SyntheticSource(size, channels, seed)
        source(0, 1)  # fails here, not mid-run, on a size or channel count it cannot make
        images = LazyImages(n, (channels, size, size), np.float32, lambda lo, hi: source(lo, hi)[0])
        masks = LazyImages(n, (size, size), bool, lambda lo, hi: source(lo, hi)[1])
        return ImageSet(spec=spec, images=images, names=tuple(str(i) for i in range(n)), masks=masks)
    if spec in ("faces", "nonfaces"):
        if n > LFW_FACES:
            raise DiffcircuitError(f"'{spec}' has {LFW_FACES} images (LFW subset); ask for --n {LFW_FACES} or fewer, or give an image folder")
        images = lfw_images(spec, size=size, channels=channels)[:n]
        return ImageSet(spec=spec, images=images, names=tuple(str(i) for i in range(n)))
    folder = Path(spec).expanduser()
    if not folder.is_dir():
        raise DiffcircuitError(f"data spec {spec!r} is not one of {', '.join(BUILTIN_SPECS)} nor an existing folder")
    captions_for(folder, [])  # a malformed caption file fails before any image is read
    images, names = folder_images(folder, n=n, size=size, channels=channels, skip_bad=skip_bad)
    return ImageSet(spec=str(folder), images=images, names=tuple(names), captions=captions_for(folder, names))
