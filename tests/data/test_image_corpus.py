"""Unusual but valid images convert correctly; broken ones give one clear error naming the file."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from diffcircuit import DiffcircuitError, load_images
from diffcircuit.data.folder import prepare_image


def _one(tmp_path, name, make):
    path = tmp_path / name
    make(path)
    return path


@pytest.mark.parametrize("channels", [1, 3])
def test_valid_variants_convert(tmp_path, channels):
    grey = np.full((16, 16), 200, np.uint8)
    makers = {
        "rgba.png": lambda p: Image.fromarray(
            np.dstack([np.full((16, 16, 3), 200, np.uint8), np.full((16, 16), 7, np.uint8)]), "RGBA"
        ).save(p),
        "deep.png": lambda p: Image.fromarray(grey.astype(np.uint16) * 257).save(p),
        "cmyk.jpg": lambda p: Image.new("CMYK", (16, 16), (0, 0, 0, 55)).save(p, quality=100),
        "palette.png": lambda p: (
            Image.fromarray(np.full((16, 16, 3), 200, np.uint8), "RGB")
            .convert("P", palette=Image.Palette.ADAPTIVE)
            .save(p)
        ),
        "grey.png": lambda p: Image.fromarray(grey, "L").save(p),
        "rgb.png": lambda p: Image.fromarray(np.full((16, 16, 3), 200, np.uint8), "RGB").save(p),
    }
    for name, make in makers.items():
        pixels = prepare_image(_one(tmp_path, name, make), size=8, channels=channels)
        assert pixels.shape == (channels, 8, 8), name
        # every variant encodes the same grey level 200 (CMYK K=55 is 255-55 = 200); JPEG may be off by a little
        np.testing.assert_allclose(pixels, 200 / 127.5 - 1, atol=0.03, err_msg=name)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("corrupt.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "cannot read image"),
        ("empty.png", b"", "cannot read image"),
        ("text.png", b"hello, I am not a picture", "cannot read image"),
    ],
)
def test_broken_files_are_named(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DiffcircuitError, match=message) as info:
        load_images(str(tmp_path), n=1, size=8, channels=3)
    assert name in str(info.value) and "\n" not in str(info.value)


def test_tiny_and_huge_images_are_refused(tmp_path, monkeypatch):
    Image.new("RGB", (1, 1)).save(tmp_path / "dot.png")
    with pytest.raises(DiffcircuitError, match="minimum"):
        prepare_image(tmp_path / "dot.png", size=8, channels=3)
    Image.new("L", (200, 200)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # a 40,000-pixel image is now a "bomb"
    with pytest.raises(DiffcircuitError, match="decompression-bomb"):
        prepare_image(tmp_path / "big.png", size=8, channels=3)
