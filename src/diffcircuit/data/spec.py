"""Data specs: ``synthetic``, ``faces``, ``nonfaces`` or a folder path, resolved to an image set.

Synthetic images are made slice by slice when asked for (``LazyImages``): image ``i`` depends on
``(seed, i)`` alone, so a run over 100,000 of them never holds them all in memory.

Two options make the synthetic set more like another one (``load_images(..., gray=, match_to=)``):

- ``gray``: the same images rendered as luminance in every channel (the format of grayscale data);
- ``match_to``: intensity-histogram matching. Synthetic image ``i`` takes the luminance histogram of
  reference image ``i mod m`` by a monotone map of its luminance L in [0, 1] (colour images move every
  channel by L' − L, then clip), while shapes, edges' positions and layout stay. The map is quantile
  matching, as ``skimage.exposure.match_histograms`` (identical to it on images without repeated
  values), except at ties: a synthetic image is mostly flat regions, and skimage sends all pixels of one
  level to the reference value at the *top* of that level's quantile range (measured: mean intensity
  0.55 against the faces' 0.45); here a level goes to the *mean* of the reference values over its
  quantile range, so each image's mean intensity equals its reference's exactly and flat regions stay
  flat (its SD can only be smaller than the reference's: the spread within a level is not created).
  Image ``i`` still depends on ``(seed, i)`` and the reference only.
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
from diffcircuit.data.synthetic import LUMA_WEIGHTS, SEED_LIMIT, synthetic_images
from diffcircuit.errors import ConfigError, InputError

__all__ = [
    "BUILTIN_SPECS",
    "ImageSet",
    "LazyImages",
    "is_grayscale",
    "load_images",
    "match_levels",
    "match_luminance",
]

BUILTIN_SPECS = ("synthetic", "faces", "nonfaces")


class LazyImages:
    """An array ``[n, *item_shape]`` whose slices are computed when asked for (``load(lo, hi)``).

    Slicing with step 1 gives a NumPy array of just that slice (made in one call); other slices and
    integer arrays pick rows one by one; ``np.asarray`` gives the whole array.
    """

    def __init__(
        self, n: int, item_shape: tuple[int, ...], dtype, load: Callable[[int, int], np.ndarray]
    ):
        self._n, self._item_shape, self.dtype, self._load = (
            n,
            tuple(item_shape),
            np.dtype(dtype),
            load,
        )

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
            yield self[lo : lo + size]


def _luminance(images: np.ndarray) -> np.ndarray:
    """``[n, C, H, W]`` in [-1, 1] -> ``[n, H, W]`` luminance in [0, 1] (as ``metrics.probes.luminance``)."""
    x = (np.asarray(images, dtype=np.float64) + 1) / 2
    if x.shape[1] == 3:
        return np.tensordot(np.asarray(LUMA_WEIGHTS), x, axes=([0], [1]))
    return x.mean(1)


def match_levels(source: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Quantile matching of ``source``'s values to ``reference``'s (same number of values): each distinct
    source level, occupying sorted positions [lo, hi), becomes the mean of the sorted reference values there."""
    ref = np.sort(np.asarray(reference, dtype=np.float64).ravel())
    if ref.size != source.size:
        raise ConfigError(
            f"histogram matching needs equally many pixels, not {source.size} and {ref.size}"
        )
    levels, inverse, counts = np.unique(source, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)  # [levels]: where each level's sorted positions end
    sums = np.concatenate([[0.0], np.cumsum(ref)])
    means = (sums[ends] - sums[ends - counts]) / counts
    return means[inverse].reshape(source.shape)


def match_luminance(images: np.ndarray, reference: np.ndarray, first: int = 0) -> np.ndarray:
    """Images ``first ..`` with each image's luminance histogram matched to reference image ``(first + i) mod m``.

    ``images`` ``[n, C, H, W]`` and ``reference`` ``[m, C', H, W]`` in [-1, 1]. Grayscale images (one channel,
    or equal channels) stay grayscale; colour images shift every channel by the luminance change, clipped.
    """
    lum, ref = _luminance(images), _luminance(reference)
    if lum.shape[1:] != ref.shape[1:]:
        raise ConfigError(
            f"histogram matching needs images of one size, not {lum.shape[1:]} and {ref.shape[1:]}"
        )
    x = (np.asarray(images, dtype=np.float64) + 1) / 2
    out = np.empty_like(x)
    for i in range(len(x)):
        matched = match_levels(
            lum[i], ref[(first + i) % len(ref)]
        )  # [H, W], values from the reference
        out[i] = (
            matched[None]
            if is_grayscale(images[i : i + 1])
            else np.clip(x[i] + (matched - lum[i])[None], 0, 1)
        )
    return (out * 2 - 1).astype(np.float32)


def is_grayscale(images) -> bool:
    """True when every image has one channel or identical channels (R = G = B), as LFW's faces after loading."""
    chunks = images.chunks() if isinstance(images, LazyImages) else [np.asarray(images)]
    return all(
        c.shape[1] == 1 or all(np.array_equal(c[:, 0], c[:, k]) for k in range(1, c.shape[1]))
        for c in chunks
    )


class _SyntheticSource:
    """Synthetic images and masks by slice; the last slice is kept, since images and masks are asked in pairs."""

    def __init__(
        self,
        size: int,
        channels: int,
        seed: int,
        gray: bool = False,
        match_to: np.ndarray | None = None,
    ):
        self.size, self.channels, self.seed, self.gray, self.match_to = (
            size,
            channels,
            seed,
            gray,
            match_to,
        )
        self._last: tuple[tuple[int, int], tuple[np.ndarray, np.ndarray]] | None = None

    def __call__(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        if self._last is None or self._last[0] != (lo, hi):
            images, masks, _ = synthetic_images(
                hi - lo,
                size=self.size,
                channels=self.channels,
                seed=self.seed,
                start=lo,
                gray=self.gray,
            )
            if self.match_to is not None and hi > lo:
                images = match_luminance(images, self.match_to, first=lo)
            self._last = ((lo, hi), (images, masks))
        return self._last[1]


@dataclass(frozen=True, kw_only=True, eq=False)
class ImageSet:
    """Images ``[n, channels, size, size]`` in [-1, 1], with where they came from. For a latent model,
    ``images`` are the autoencoder's latents (what the network sees) and ``pixels`` the images they encode."""

    spec: str
    images: np.ndarray | LazyImages
    names: tuple[str, ...]  # one label per image: its index or its path in the folder
    masks: np.ndarray | LazyImages | None = (
        None  # [n, size, size] object masks (synthetic only), in pixels
    )
    pixels: np.ndarray | LazyImages | None = None  # latent models: the images ``images`` encode
    captions: tuple[str, ...] | None = (
        None  # one prompt per image (an image folder's captions.csv / .jsonl)
    )
    rendering: str | None = (
        None  # synthetic sets: "color" or "gray", and "+histogram-matched" when matched
    )

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
        chunks = (
            self.pictures.chunks() if isinstance(self.pictures, LazyImages) else [self.pictures]
        )
        for chunk in chunks:
            digest.update(np.ascontiguousarray(chunk).tobytes())
        for caption in self.captions or ():
            digest.update(caption.encode() + b"\0")
        return digest.hexdigest()[:16]


def load_images(
    spec: str,
    *,
    n: int,
    size: int,
    channels: int,
    seed: int = 0,
    skip_bad: bool = False,
    gray: bool = False,
    match_to: np.ndarray | None = None,
) -> ImageSet:
    """Resolve a data spec to ``n`` prepared images. ``gray`` and ``match_to`` (reference images ``[m, C, size,
    size]`` for histogram matching) apply to the synthetic set only."""
    if n < 1:
        raise ConfigError(f"need at least one image, not n={n}", "n")
    if (gray or match_to is not None) and spec != "synthetic":
        raise ConfigError(
            f"grayscale rendering and histogram matching apply to the synthetic set, not {spec!r}"
        )
    if spec == "synthetic":
        if not 0 <= seed < SEED_LIMIT or n > SEED_LIMIT:
            raise ConfigError(
                f"seed must lie in [0, 2**32) for synthetic images, not {seed}", "seed"
            )
        if match_to is not None:
            match_to = np.asarray(match_to, dtype=np.float32)
            if match_to.shape[-2:] != (size, size) or len(match_to) == 0:
                raise ConfigError(
                    f"histogram matching needs reference images of {size}x{size} pixels"
                )
        source = _SyntheticSource(size, channels, seed, gray, match_to)
        source(0, 1)  # fails here, not mid-run, on a size or channel count it cannot make
        lazy = LazyImages(n, (channels, size, size), np.float32, lambda lo, hi: source(lo, hi)[0])
        lazy_masks = LazyImages(n, (size, size), bool, lambda lo, hi: source(lo, hi)[1])
        rendering = ("gray" if gray or channels == 1 else "color") + (
            "+histogram-matched" if match_to is not None else ""
        )
        return ImageSet(
            spec=spec,
            images=lazy,
            names=tuple(str(i) for i in range(n)),
            masks=lazy_masks,
            rendering=rendering,
        )
    if spec in ("faces", "nonfaces"):
        if n > LFW_FACES:
            raise ConfigError(
                f"'{spec}' has {LFW_FACES} images (LFW subset); ask for n {LFW_FACES} or fewer, or give an image folder",
                "n",
            )
        images = lfw_images(spec, size=size, channels=channels)[:n]
        return ImageSet(spec=spec, images=images, names=tuple(str(i) for i in range(n)))
    folder = Path(spec).expanduser()
    if not folder.is_dir():
        raise InputError(
            f"data spec {spec!r} is not one of {', '.join(BUILTIN_SPECS)} nor an existing folder"
        )
    captions_for(folder, [])  # a malformed caption file fails before any image is read
    images, names = folder_images(folder, n=n, size=size, channels=channels, skip_bad=skip_bad)
    return ImageSet(
        spec=str(folder), images=images, names=tuple(names), captions=captions_for(folder, names)
    )
