from __future__ import annotations

import numpy as np
import pytest

from diffcircuit.data.synthetic import SHAPE_KINDS, synthetic_images


def test_image_i_is_the_same_whatever_else_is_drawn():
    a, ma, ka = synthetic_images(10, seed=3)
    b, mb, kb = synthetic_images(4, seed=3, start=6)
    np.testing.assert_array_equal(a[6:], b)
    np.testing.assert_array_equal(ma[6:], mb)
    assert ka[6:] == kb
    c, _, _ = synthetic_images(4, seed=4, start=6)
    assert not np.array_equal(b, c)


def test_range_shapes_and_masks():
    images, masks, kinds = synthetic_images(120, size=24, seed=0)
    assert images.shape == (120, 3, 24, 24) and images.dtype == np.float32
    assert images.min() >= -1.0 and images.max() <= 1.0
    assert masks.shape == (120, 24, 24) and masks.dtype == bool
    assert set(kinds) == set(SHAPE_KINDS)
    frac = masks.mean(axis=(1, 2))
    assert (frac > 0.02).all() and (
        frac < 0.8
    ).all()  # every image has an object, none is all object


def test_mask_marks_the_object_solid_shapes_are_uniform_inside():
    images, masks, kinds = synthetic_images(60, size=32, seed=1)
    for img, mask, kind in zip(images, masks, kinds):
        if kind not in ("circle", "square", "triangle"):
            continue
        # erode the mask by one pixel to avoid anti-aliased edges; inside, colour is constant
        core = mask.copy()
        core[1:] &= mask[:-1]
        core[:-1] &= mask[1:]
        core[:, 1:] &= mask[:, :-1]
        core[:, :-1] &= mask[:, 1:]
        if core.sum() >= 4:
            assert img[:, core].std(axis=1).max() < 1e-5


def test_grayscale_and_bad_channel_counts():
    gray, _, _ = synthetic_images(3, channels=1)
    assert gray.shape == (3, 1, 32, 32)
    with pytest.raises(ValueError):
        synthetic_images(1, channels=2)
