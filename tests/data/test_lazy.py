"""Synthetic image sets are made slice by slice: every slice, the whole array and the fingerprint equal
those of the images made all at once."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from diffcircuit import load_images
from diffcircuit.data.spec import LazyImages
from diffcircuit.data.synthetic import synthetic_images


def test_lazy_synthetic_slices_equal_the_eager_images_and_fingerprint():
    eager, masks, _ = synthetic_images(23, size=16, channels=3, seed=5)
    s = load_images("synthetic", n=23, size=16, channels=3, seed=5)
    assert isinstance(s.images, LazyImages) and s.images.shape == eager.shape and len(s) == 23
    np.testing.assert_array_equal(s.images[7:19], eager[7:19])
    np.testing.assert_array_equal(s.masks[7:19], masks[7:19])
    np.testing.assert_array_equal(s.images[-1], eager[-1])
    np.testing.assert_array_equal(np.asarray(s.images, dtype=np.float64), eager.astype(np.float64))
    assert s.fingerprint == hashlib.sha256(eager.tobytes()).hexdigest()[:16]
    assert s.images[20:40].shape == (3, 3, 16, 16)  # slices clip like NumPy's
    draw = np.array([4, 0, 4, 22])  # bootstrap resampling indexes with integer arrays
    np.testing.assert_array_equal(s.images[draw], eager[draw])
    np.testing.assert_array_equal(s.images[::5], eager[::5])


def test_lazy_images_refuse_what_they_cannot_slice():
    lazy = LazyImages(
        4,
        (2,),
        np.float32,
        lambda lo, hi: np.arange(lo, hi, dtype=np.float32)[:, None].repeat(2, 1),
    )
    with pytest.raises(IndexError):
        lazy[4]
    with pytest.raises(TypeError):
        lazy[np.array([0.5])]
