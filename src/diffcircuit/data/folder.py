"""Any image folder (recursive, following symlinked subfolders; png/jpg/jpeg/webp/gif/bmp/tiff), prepared the way
diffusers pipelines do.

Files are taken in sorted path order (the first ``n``); an animated GIF gives its first frame. Each image is converted to the model's
channel count (RGB or L: palette, CMYK and grayscale images are converted; an alpha channel is
dropped; 16-bit images are scaled to 8-bit range, not clipped), centre-cropped to a square,
resized with Lanczos to the model's size, and mapped to [-1, 1] as ``x / 127.5 - 1``. CelebA's
``img_align_celeba/`` works as is. Images smaller than ``MIN_SIDE`` pixels on a side, or larger
than Pillow's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``), are refused.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from diffcircuit.errors import DiffcircuitError, DiffcircuitWarning, InputError

__all__ = ["IMAGE_SUFFIXES", "MIN_SIDE", "folder_images", "list_images", "prepare_image"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")
MIN_SIDE = 8  # pixels; smaller images carry too little to resize meaningfully
_HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def list_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursive, symlinked subfolders followed once each: no loop), sorted."""
    import os

    found, seen = [], set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:  # a link back to a folder already walked
            dirs[:] = []
            continue
        seen.add(real)
        found += [Path(root) / f for f in files if Path(f).suffix.lower() in IMAGE_SUFFIXES]
    return sorted(p for p in found if p.is_file())


def _to_mode(im, channels: int):
    """Convert to 8-bit RGB or L; 16-bit grayscale is rescaled (Pillow's own convert would clip it)."""
    from PIL import Image

    if im.mode in _HIGH_BIT_MODES:
        wide = np.asarray(im, dtype=np.float64)
        peak = 65535.0 if im.mode != "I" or wide.max() > 255 else 255.0
        im = Image.fromarray(
            np.clip(np.round(wide / peak * 255), 0, 255).astype(np.uint8), mode="L"
        )
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    return im.convert("RGB" if channels == 3 else "L")


def prepare_image(path: Path, *, size: int, channels: int) -> np.ndarray:
    """One file as float32 ``[channels, size, size]`` in [-1, 1]; ``DiffcircuitError`` if unusable."""
    import warnings as _warnings

    from PIL import Image, UnidentifiedImageError

    try:
        with _warnings.catch_warnings():
            _warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if min(w, h) < MIN_SIDE:
                    raise InputError(
                        f"image {path} is {w}x{h}; the minimum is {MIN_SIDE}x{MIN_SIDE} pixels"
                    )
                im = _to_mode(im, channels)
                side = min(w, h)
                left, top = (w - side) // 2, (h - side) // 2
                im = im.crop((left, top, left + side, top + side)).resize(
                    (size, size), Image.Resampling.LANCZOS
                )
                pixels = np.asarray(im, dtype=np.float32)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise InputError(
            f"image {path} has more than {Image.MAX_IMAGE_PIXELS:,} pixels (decompression-bomb "
            "limit); refusing to decode it"
        ) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise InputError(
            f"cannot read image {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from None
    pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
    return pixels / 127.5 - 1.0


def folder_images(
    folder: Path, *, n: int, size: int, channels: int, skip_bad: bool = False
) -> tuple[np.ndarray, list[str]]:
    """The first ``n`` readable images of ``folder`` and their paths relative to it."""
    if channels not in (1, 3):
        raise InputError(f"image folders can feed 1- or 3-channel models, not {channels}-channel")
    files = list_images(folder)
    if not files:
        raise InputError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    images, names = [], []
    for path in files:
        if len(images) == n:
            break
        try:
            images.append(prepare_image(path, size=size, channels=channels))
        except DiffcircuitError as exc:
            if not skip_bad:
                raise InputError(
                    f"{exc} (set skip_bad to skip unreadable files)", "skip_bad"
                ) from None
            warnings.warn(f"skipping {exc}", DiffcircuitWarning, stacklevel=2)
            continue
        names.append(str(path.relative_to(folder)))
    if len(images) < n:
        raise InputError(f"{folder} has only {len(images)} readable images; asked for {n}")
    return np.stack(images).astype(np.float32), names
