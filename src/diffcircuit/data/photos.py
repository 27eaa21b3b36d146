"""Random crops of the sample photographs scikit-image ships: natural images for training, never analysed.

``TRAIN_PHOTOS`` are photographs and micrographs in scikit-image's own distribution (no download):
people, animals, objects, textures, text, astronomy, microscopy. None is an LFW image. Each is read once,
as RGB in [0, 1] (grayscale ones repeated), and shrunk (anti-aliased) to a short side of ``BASE_SIDE``
pixels. Crop ``i`` is drawn from its own generator seeded by ``(seed, i, PHOTO_NAMESPACE)``: a photo
uniformly, a square side uniformly in [``MIN_FRACTION``, 1] of the short side (so at least 32 px, never
upsampled to 32x32), a position uniformly, a horizontal flip with probability ½ and grayscale (luminance
in every channel) with probability ``gray_share``; then resized (anti-aliased, bilinear) to the model's size
and mapped to [-1, 1] as ``2x − 1`` — the same preparation as the LFW images.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from diffcircuit.data.synthetic import LUMA_WEIGHTS

__all__ = [
    "BASE_SIDE",
    "MIN_FRACTION",
    "PHOTO_NAMESPACE",
    "TRAIN_PHOTOS",
    "photo_crops",
    "sample_photos",
]

TRAIN_PHOTOS = (
    "astronaut",
    "camera",
    "cat",
    "chelsea",
    "coffee",
    "rocket",
    "brick",
    "grass",
    "gravel",
    "coins",
    "clock",
    "moon",
    "page",
    "text",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "cell",
)
BASE_SIDE = 160  # pixels on the short side after the one-off shrink
MIN_FRACTION = 0.2  # smallest crop side, as a fraction of the short side (0.2 * 160 = 32 px)
PHOTO_NAMESPACE = 0x70686F74  # "phot": the third seed word of every crop generator


@lru_cache(maxsize=1)
def sample_photos() -> tuple[np.ndarray, ...]:
    """``TRAIN_PHOTOS`` as float64 ``[H, W, 3]`` in [0, 1], short side ``BASE_SIDE``."""
    import skimage.data
    from skimage.transform import resize

    out = []
    for name in TRAIN_PHOTOS:
        im = np.asarray(getattr(skimage.data, name)(), dtype=np.float64) / 255.0
        im = np.repeat(im[..., None], 3, axis=2) if im.ndim == 2 else im[..., :3]
        scale = BASE_SIDE / min(im.shape[:2])
        shape = (round(im.shape[0] * scale), round(im.shape[1] * scale), 3)
        out.append(resize(im, shape, anti_aliasing=True, order=1))
    return tuple(out)


def _crop(photo: np.ndarray, rng: np.random.Generator, size: int, gray_share: float) -> np.ndarray:
    """One random crop ``[3, size, size]`` in [0, 1]."""
    from skimage.transform import resize

    h, w, _ = photo.shape
    side = int(round(rng.uniform(MIN_FRACTION, 1.0) * min(h, w)))
    top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    patch = photo[top : top + side, left : left + side]
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    patch = resize(patch, (size, size, 3), anti_aliasing=True, order=1)
    if rng.random() < gray_share:
        patch = np.repeat((patch @ np.asarray(LUMA_WEIGHTS))[..., None], 3, axis=2)
    return patch.transpose(2, 0, 1)


def photo_crops(
    n: int, *, size: int = 32, seed: int = 0, start: int = 0, gray_share: float = 0.5
) -> np.ndarray:
    """Crops ``start .. start+n-1``: float32 ``[n, 3, size, size]`` in [-1, 1]."""
    photos = sample_photos()
    out = np.empty((n, 3, size, size), dtype=np.float32)
    for i in range(n):
        rng = np.random.default_rng([seed, start + i, PHOTO_NAMESPACE])
        out[i] = _crop(photos[int(rng.integers(len(photos)))], rng, size, gray_share) * 2.0 - 1.0
    return np.clip(out, -1.0, 1.0)
