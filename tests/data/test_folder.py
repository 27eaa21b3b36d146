"""Image folders (``data.folder``): files found recursively and in order, pixels mapped as diffusers does,
centre-cropped, and unreadable files named or skipped. (Unusual but valid formats: ``test_image_corpus.py``.)"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from diffcircuit import DiffcircuitError, load_images


def _save(path, array, mode):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)


def test_folder_images_map_pixels_like_diffusers(tmp_path):
    solid = np.full((8, 8, 3), (200, 0, 255), dtype=np.uint8)
    _save(tmp_path / "a" / "x.png", solid, "RGB")
    _save(tmp_path / "b" / "deep" / "y.jpeg", solid, "RGB")
    (tmp_path / "notes.txt").write_text("not an image")
    s = load_images(str(tmp_path), n=2, size=8, channels=3)
    assert s.names == ("a/x.png", "b/deep/y.jpeg")
    np.testing.assert_allclose(s.images[0, :, 0, 0], np.array([200, 0, 255]) / 127.5 - 1, atol=1e-6)


def test_folder_images_are_centre_cropped(tmp_path):
    # 24 wide x 8 high: left/right thirds black, centre white -> the square crop is all white
    arr = np.zeros((8, 24), dtype=np.uint8)
    arr[:, 8:16] = 255
    _save(tmp_path / "wide.png", arr, "L")
    s = load_images(str(tmp_path), n=1, size=4, channels=1)
    np.testing.assert_allclose(s.images, 1.0, atol=1e-6)


def test_bad_files_name_the_file_or_are_skipped(tmp_path):
    _save(tmp_path / "good.png", np.zeros((8, 8, 3), np.uint8), "RGB")
    (tmp_path / "broken.jpg").write_bytes(b"this is not a jpeg")
    with pytest.raises(DiffcircuitError, match="broken.jpg"):
        load_images(str(tmp_path), n=1, size=8, channels=3)
    with pytest.warns(UserWarning, match="broken.jpg"):
        s = load_images(str(tmp_path), n=1, size=8, channels=3, skip_bad=True)
    assert s.names == ("good.png",)
    with pytest.warns(UserWarning), pytest.raises(DiffcircuitError, match="only 1 readable"):
        load_images(str(tmp_path), n=2, size=8, channels=3, skip_bad=True)


def test_empty_folder_is_refused(tmp_path):
    with pytest.raises(DiffcircuitError, match="no images"):
        load_images(str(tmp_path), n=1, size=8, channels=3)


def test_symlinked_subfolders_are_followed_once_and_gif_bmp_tiff_are_read(tmp_path):
    import os

    from diffcircuit.data.folder import folder_images, list_images

    elsewhere = tmp_path / "elsewhere"
    solid = np.full((10, 10, 3), (10, 120, 250), dtype=np.uint8)
    for name in ("a.gif", "b.bmp", "c.tiff"):
        _save(elsewhere / name, solid, "RGB")
    root = tmp_path / "data"
    _save(root / "own.png", solid, "RGB")
    os.symlink(elsewhere, root / "linked")
    os.symlink(root, elsewhere / "back")  # a loop: must not be walked forever, nor twice
    names = [p.relative_to(root).as_posix() for p in list_images(root)]
    assert names == ["linked/a.gif", "linked/b.bmp", "linked/c.tiff", "own.png"]
    images, _ = folder_images(root, n=4, size=10, channels=3)
    expected = solid.transpose(2, 0, 1) / 127.5 - 1  # GIF's palette holds the three exact colours
    for image in images:
        np.testing.assert_allclose(image, expected, atol=1e-6)


def test_a_skipped_image_is_a_diffcircuit_warning(tmp_path):
    from diffcircuit.data.folder import folder_images
    from diffcircuit.errors import DiffcircuitWarning

    _save(tmp_path / "b.png", np.zeros((10, 10, 3), dtype=np.uint8), "RGB")
    (tmp_path / "a.png").write_bytes(b"not an image")
    with pytest.warns(DiffcircuitWarning, match="a.png"):
        images, names = folder_images(tmp_path, n=1, size=8, channels=3, skip_bad=True)
    assert names == ["b.png"]
