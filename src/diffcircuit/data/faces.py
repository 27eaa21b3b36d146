"""Natural faces that ship offline: scikit-image's LFW subset.

``skimage.data.lfw_subset()`` holds 200 grayscale 25x25 crops: the first 100 are real faces from
Labeled Faces in the Wild, the last 100 are non-face patches. The faces are the demo's "natural"
distribution; the non-faces are a control set. Both are resized (anti-aliased) to the model's
size, replicated to its channel count and mapped to [-1, 1] as ``2*x - 1`` (pixels are floats in
[0, 1], so this is the same map as diffusers' ``x / 127.5 - 1`` on 8-bit pixels).
"""

from __future__ import annotations

import numpy as np

from diffcircuit.errors import ConfigError

__all__ = ["LFW_FACES", "lfw_images"]

LFW_FACES = 100  # faces are rows 0..99 of lfw_subset(), non-faces rows 100..199


def lfw_images(which: str = "faces", *, size: int = 32, channels: int = 3) -> np.ndarray:
    """All 100 LFW faces (``which="faces"``) or non-faces, float32 ``[100, channels, size, size]``."""
    from skimage.data import lfw_subset
    from skimage.transform import resize

    if which not in ("faces", "nonfaces"):
        raise ConfigError(f"which must be 'faces' or 'nonfaces', not {which!r}")
    raw = lfw_subset()  # [200, 25, 25] float64 in [0, 1]
    part = raw[:LFW_FACES] if which == "faces" else raw[LFW_FACES:]
    resized = np.stack([resize(im, (size, size), anti_aliasing=True, order=1) for im in part])
    out = np.repeat(resized[:, None], channels, axis=1) * 2.0 - 1.0
    return np.clip(out, -1.0, 1.0).astype(np.float32)
