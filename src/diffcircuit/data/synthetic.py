"""Seeded procedural images: the paper's "synthetic" distribution, with ground-truth object masks.

Every image is drawn from its own generator seeded by ``(seed, index)``, so image ``i`` is the
same whatever ``n``, batch size or shard asks for it (a run can be split and resumed freely).
Images for *training* a model (``namespace`` given, nonzero) come from generators seeded by
``(seed, index, namespace)`` instead. NumPy's ``SeedSequence`` pads its entropy with zero words to
four and mixes those four 32-bit words injectively, so with seed and index below 2**32 (checked) an
analysed image's generator ``(seed, index, 0, 0)`` never has a training image's state
``(seed', index', namespace, 0)``: no analysed synthetic image is ever a training image, whatever
seed a run uses.
Each image is one foreground object on a background:

- object shapes: circle, square, triangle (solid colour), and stripes, checkerboard, gradient
  patches (a square region filled with that pattern);
- backgrounds: solid colour, linear gradient, or faint stripes.

Edges are anti-aliased by 4x supersampling. Pixels are in [-1, 1], channel-first. ``gray=True``
renders the same images (the same draws) as their luminance 0.299 R + 0.587 G + 0.114 B, repeated
in every channel: the format of grayscale data such as LFW's faces.
"""

from __future__ import annotations

import numpy as np

from diffcircuit.errors import ConfigError

__all__ = ["LUMA_WEIGHTS", "SEED_LIMIT", "SHAPE_KINDS", "synthetic_images"]

SHAPE_KINDS = ("circle", "square", "triangle", "stripes", "checkerboard", "gradient")
LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R BT.601 luminance, as metrics.probes uses
SEED_LIMIT = (
    2**32
)  # seeds, indices and namespaces are single 32-bit words (see the module docstring)
_SUPERSAMPLE = 4


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Supersampled pixel-centre coordinates in [0, 1): two arrays of shape [size*4, size*4]."""
    n = size * _SUPERSAMPLE
    axis = (np.arange(n) + 0.5) / n
    return np.meshgrid(axis, axis, indexing="ij")  # (y, x)


def _downsample(a: np.ndarray, size: int) -> np.ndarray:
    """Box-filter a supersampled [..., size*4, size*4] array back to [..., size, size]."""
    s = _SUPERSAMPLE
    return a.reshape(*a.shape[:-2], size, s, size, s).mean(axis=(-3, -1))


def _shape_region(kind: str, rng: np.random.Generator, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Boolean supersampled region covered by the object."""
    cy, cx = rng.uniform(0.3, 0.7, size=2)
    r = rng.uniform(0.15, 0.3)
    if kind == "circle":
        return (y - cy) ** 2 + (x - cx) ** 2 <= r**2
    if kind == "triangle":
        # Isosceles triangle, apex up, optionally flipped: inside all three half-planes.
        flip = rng.random() < 0.5
        yy = (cy - y) if flip else (y - cy)
        inside_base = yy <= r
        inside_sides = np.abs(x - cx) <= (yy + r) * 0.6
        return inside_base & inside_sides & (yy >= -r)
    # square and the patterned patches share a (possibly rotated) square footprint
    angle = rng.uniform(0, np.pi / 2) if kind == "square" else 0.0
    dy, dx = y - cy, x - cx
    u = dy * np.cos(angle) - dx * np.sin(angle)
    v = dy * np.sin(angle) + dx * np.cos(angle)
    return (np.abs(u) <= r) & (np.abs(v) <= r)


def _pattern(kind: str, rng: np.random.Generator, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Mixing weight in [0, 1] between two colours: 1 everywhere for solid shapes."""
    if kind == "stripes":
        period = rng.uniform(0.08, 0.2)
        theta = rng.uniform(0, np.pi)
        phase = (y * np.cos(theta) + x * np.sin(theta)) / period
        return (np.floor(phase) % 2).astype(np.float64)
    if kind == "checkerboard":
        cell = rng.uniform(0.06, 0.15)
        return ((np.floor(y / cell) + np.floor(x / cell)) % 2).astype(np.float64)
    if kind == "gradient":
        theta = rng.uniform(0, 2 * np.pi)
        ramp = y * np.cos(theta) + x * np.sin(theta)
        return (ramp - ramp.min()) / max(np.ptp(ramp), 1e-9)
    return np.ones_like(y)


def _background(rng: np.random.Generator, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """RGB background in [0, 1], shape [3, H, W] (supersampled)."""
    c1, c2 = rng.uniform(0, 1, size=(2, 3))
    style = rng.integers(3)
    if style == 0:  # solid
        w = np.zeros_like(y)
    elif style == 1:  # linear gradient
        theta = rng.uniform(0, 2 * np.pi)
        ramp = y * np.cos(theta) + x * np.sin(theta)
        w = (ramp - ramp.min()) / max(np.ptp(ramp), 1e-9)
    else:  # faint stripes
        period = rng.uniform(0.1, 0.3)
        w = 0.25 * (np.floor((y + x) / period) % 2)
    return c1[:, None, None] * (1 - w) + c2[:, None, None] * w


def _one_image(
    size: int, channels: int, rng: np.random.Generator, gray: bool = False
) -> tuple[np.ndarray, np.ndarray, str]:
    y, x = _grid(size)
    kind = SHAPE_KINDS[rng.integers(len(SHAPE_KINDS))]
    region = _shape_region(kind, rng, y, x)
    a, b = rng.uniform(0, 1, size=(2, 3))
    w = _pattern(kind, rng, y, x)
    fg = a[:, None, None] * w + b[:, None, None] * (1 - w)  # [3, H*4, W*4]
    img = np.where(region, fg, _background(rng, y, x))
    rgb = _downsample(img, size)
    if channels not in (1, 3):
        raise ConfigError(f"synthetic images support 1 or 3 channels, not {channels}")
    if channels == 1 or gray:
        lum = sum(w * c for w, c in zip(LUMA_WEIGHTS, rgb))  # [H, W]
        rgb = np.repeat(lum[None], channels, axis=0)
    mask = _downsample(region.astype(np.float64), size) >= 0.5
    return rgb, mask, kind


def synthetic_images(
    n: int,
    *,
    size: int = 32,
    channels: int = 3,
    seed: int = 0,
    start: int = 0,
    gray: bool = False,
    namespace: int = 0,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Images ``start .. start+n-1`` of the seeded synthetic distribution (``namespace`` 0: the analysed
    images; nonzero: a training pool that provably shares no generator with them).

    Returns ``(images, masks, kinds)``: images float32 ``[n, channels, size, size]`` in [-1, 1],
    masks bool ``[n, size, size]`` (True on the object), and each image's shape kind.
    """
    if n < 0 or size < 4:
        raise ConfigError("need n >= 0 and size >= 4")
    if not (
        0 <= seed < SEED_LIMIT
        and 0 <= start
        and start + n <= SEED_LIMIT
        and 0 <= namespace < SEED_LIMIT
    ):
        raise ConfigError(
            f"synthetic seeds, image indices and namespaces must lie in [0, 2**32), not seed={seed}, "
            f"indices {start}..{start + n - 1}, namespace={namespace}"
        )
    images = np.empty((n, channels, size, size), dtype=np.float32)
    masks = np.empty((n, size, size), dtype=bool)
    kinds = []
    for i in range(n):
        entropy = [seed, start + i] if namespace == 0 else [seed, start + i, namespace]
        rgb, mask, kind = _one_image(size, channels, np.random.default_rng(entropy), gray)
        images[i] = rgb * 2.0 - 1.0
        masks[i] = mask
        kinds.append(kind)
    return images, masks, kinds
