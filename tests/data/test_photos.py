"""Random crops of scikit-image's sample photographs (``data.photos``): the photos as documented, and crops drawn
by the documented rule (crop i from its own generator), rebuilt here step by step."""

from __future__ import annotations

import numpy as np
import pytest

from diffcircuit.data.photos import (
    BASE_SIDE,
    MIN_FRACTION,
    PHOTO_NAMESPACE,
    TRAIN_PHOTOS,
    photo_crops,
    sample_photos,
)


def test_the_photos_are_rgb_in_unit_range_with_a_short_side_of_base_side():
    photos = sample_photos()
    assert len(photos) == len(TRAIN_PHOTOS) == 18
    for name, photo in zip(TRAIN_PHOTOS, photos):
        assert photo.ndim == 3 and photo.shape[2] == 3 and min(photo.shape[:2]) == BASE_SIDE, name
        assert 0 <= photo.min() and photo.max() <= 1, name
    gray = dict(zip(TRAIN_PHOTOS, photos))[
        "camera"
    ]  # a grayscale photograph: one level in every channel
    assert (gray[..., 1:] == gray[..., :1]).all()


def _documented_crop(i: int, *, size: int, seed: int, gray_share: float) -> np.ndarray:
    """Crop i by the module's documented rule, written out with plain NumPy and scikit-image."""
    from skimage.transform import resize

    photos = sample_photos()
    rng = np.random.default_rng([seed, i, PHOTO_NAMESPACE])
    photo = photos[int(rng.integers(len(photos)))]
    h, w, _ = photo.shape
    side = int(round(rng.uniform(MIN_FRACTION, 1.0) * min(h, w)))
    assert side >= 32  # never upsampled to 32x32
    top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    patch = photo[top : top + side, left : left + side]
    if rng.random() < 0.5:
        patch = np.flip(patch, axis=1)
    patch = resize(patch, (size, size, 3), anti_aliasing=True, order=1)
    if rng.random() < gray_share:
        lum = 0.299 * patch[..., 0] + 0.587 * patch[..., 1] + 0.114 * patch[..., 2]
        patch = np.stack([lum] * 3, axis=2)
    return np.clip(patch.transpose(2, 0, 1) * 2 - 1, -1, 1)


@pytest.mark.parametrize(("seed", "gray_share"), [(0, 0.5), (7, 0.0), (3, 1.0)])
def test_crops_follow_the_documented_rule(seed, gray_share):
    crops = photo_crops(6, size=16, seed=seed, gray_share=gray_share)
    assert crops.shape == (6, 3, 16, 16) and crops.dtype == np.float32
    for i, crop in enumerate(crops):
        expected = _documented_crop(i, size=16, seed=seed, gray_share=gray_share)
        np.testing.assert_allclose(crop, expected, atol=1e-5, err_msg=f"crop {i}")
    if gray_share == 1.0:
        assert (crops[:, 1:] == crops[:, :1]).all()


def test_a_crop_depends_only_on_the_seed_and_its_index():
    crops = photo_crops(5, size=16, seed=2)
    np.testing.assert_array_equal(photo_crops(2, size=16, seed=2, start=3), crops[3:5])
    assert not np.array_equal(photo_crops(5, size=16, seed=4), crops)
