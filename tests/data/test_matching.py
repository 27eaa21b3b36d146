"""Making the synthetic set more like another: grayscale rendering, histogram matching, seed namespaces."""

from __future__ import annotations

import numpy as np
import pytest

from diffcircuit import DiffcircuitError, load_images
from diffcircuit.data.faces import lfw_images
from diffcircuit.data.spec import is_grayscale, match_levels, match_luminance
from diffcircuit.data.synthetic import synthetic_images


def test_gray_images_are_the_colour_images_luminance_in_every_channel():
    colour, masks, kinds = synthetic_images(12, size=16, seed=2)
    gray, gray_masks, gray_kinds = synthetic_images(12, size=16, seed=2, gray=True)
    rgb = (colour.astype(np.float64) + 1) / 2
    lum = 0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]
    for c in range(3):
        np.testing.assert_allclose(gray[:, c], lum * 2 - 1, atol=1e-6)
    np.testing.assert_array_equal(gray[:, 0], gray[:, 2])  # exactly equal channels, as LFW's faces
    np.testing.assert_array_equal(masks, gray_masks)
    assert kinds == gray_kinds
    assert is_grayscale(gray) and not is_grayscale(colour)
    assert is_grayscale(lfw_images("faces")) and is_grayscale(lfw_images("nonfaces"))


def test_seed_sequences_pad_with_zero_words_so_a_nonzero_third_word_is_a_new_generator():
    """The fact the namespace's disjointness rests on (``data.synthetic``'s docstring)."""
    state = lambda words: np.random.SeedSequence(words).generate_state(8).tolist()
    assert (
        state([3, 5]) == state([3, 5, 0]) == state([3, 5, 0, 0])
    )  # what makes (seed, i) a 4-word (seed, i, 0, 0)
    assert state([3, 5, 7]) != state([3, 5])
    a = synthetic_images(5, size=16, seed=0)[0]
    b = synthetic_images(5, size=16, seed=0, namespace=7)[0]
    assert all(not np.array_equal(x, y) for x, y in zip(a, b))


def test_seeds_beyond_one_word_are_refused():
    with pytest.raises(ValueError, match="2\\*\\*32"):
        synthetic_images(1, seed=2**32)
    with pytest.raises(DiffcircuitError, match="seed"):
        load_images("synthetic", n=1, size=16, channels=3, seed=2**32)


def test_level_matching_is_skimage_histogram_matching_on_images_without_ties():
    from skimage.exposure import match_histograms

    rng = np.random.default_rng(0)
    source, reference = rng.random((9, 11)), rng.beta(2, 5, (9, 11))
    np.testing.assert_allclose(
        match_levels(source, reference), match_histograms(source, reference), atol=1e-12
    )
    np.testing.assert_allclose(
        np.sort(match_levels(source, reference).ravel()), np.sort(reference.ravel()), atol=1e-12
    )


def test_level_matching_keeps_flat_regions_flat_and_the_mean_exact():
    rng = np.random.default_rng(1)
    source = np.repeat([0.2, 0.5, 0.9], [50, 30, 20]).reshape(10, 10)  # three flat levels
    reference = rng.random(100)
    out = match_levels(source, reference)
    assert len(np.unique(out)) == 3  # still three levels, in the same order
    assert np.all(np.diff([out[source == v][0] for v in (0.2, 0.5, 0.9)]) > 0)
    assert abs(out.mean() - reference.mean()) < 1e-12
    ranked = np.sort(reference)
    assert abs(out[source == 0.2][0] - ranked[:50].mean()) < 1e-12


def test_matched_synthetic_images_take_the_reference_images_mean_intensity():
    faces = lfw_images("faces", size=16)
    s = load_images("synthetic", n=7, size=16, channels=3, gray=True, match_to=faces[:5])
    assert s.rendering == "gray+histogram-matched"
    x = np.asarray(s.images)
    assert is_grayscale(x)
    lum = lambda im: ((im.astype(np.float64) + 1) / 2).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(
        lum(x), lum(faces[np.arange(7) % 5]), atol=1e-6
    )  # image i takes face i mod 5's
    # lazily made slices equal the whole set's rows
    np.testing.assert_array_equal(s.images[3:6], x[3:6])
    # colour images shift every channel by the luminance change
    colour = synthetic_images(3, size=16, seed=0)[0]
    moved = match_luminance(colour, faces)
    assert not is_grayscale(moved) and moved.min() >= -1 and moved.max() <= 1


def test_grayscale_and_matching_are_for_the_synthetic_set_only():
    with pytest.raises(DiffcircuitError, match="synthetic"):
        load_images("faces", n=2, size=16, channels=3, gray=True)
