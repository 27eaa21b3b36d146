"""LFW faces and non-faces (``data.faces``), against scikit-image's own ``lfw_subset`` pixels."""

from __future__ import annotations

import numpy as np
import pytest

from diffcircuit.data.faces import LFW_FACES, lfw_images
from diffcircuit.errors import ConfigError


def test_lfw_faces_and_nonfaces_are_distinct_sets_of_100():
    from skimage.data import lfw_subset

    faces, nonfaces = lfw_images("faces", size=25), lfw_images("nonfaces", size=25)
    assert faces.shape == nonfaces.shape == (100, 3, 25, 25)
    raw = lfw_subset()
    # at the native size the map is exactly 2x - 1 of scikit-image's pixels
    np.testing.assert_allclose(faces[:, 0], raw[:100] * 2 - 1, atol=1e-6)
    np.testing.assert_allclose(nonfaces[:, 1], raw[100:] * 2 - 1, atol=1e-6)


def test_resized_faces_keep_their_mean_and_fill_every_channel_alike():
    """At another size: the same faces (each image's mean brightness kept by anti-aliased resizing, to within a
    few levels), in [-1, 1], one gray image repeated in every channel; unknown sets refused."""
    from skimage.data import lfw_subset

    raw = lfw_subset()[:LFW_FACES]
    faces = lfw_images("faces", size=48, channels=3)
    assert faces.shape == (100, 3, 48, 48) and faces.dtype == np.float32
    assert faces.min() >= -1 and faces.max() <= 1
    assert (faces[:, 1:] == faces[:, :1]).all()
    np.testing.assert_allclose(faces[:, 0].mean((1, 2)), raw.mean((1, 2)) * 2 - 1, atol=0.02)
    assert lfw_images("nonfaces", size=16, channels=1).shape == (100, 1, 16, 16)
    with pytest.raises(ConfigError, match="'faces' or 'nonfaces'"):
        lfw_images("celebrities")
