"""One setup for every command (``protocol.setup``): inputs are checked before anything is computed."""

from __future__ import annotations

import numpy as np
import pytest

import diffcircuit as dc
from diffcircuit.protocol.setup import build_setup, one_set


def test_bad_timesteps_are_refused_before_any_image_is_made():
    made = []

    def images(den):
        made.append(den)
        return {}

    with pytest.raises(dc.DiffcircuitError, match="outside"):
        build_setup(dc.ModelSpec(device="cpu"), timesteps=[5000], images=images)
    assert made == []


def test_a_setup_holds_the_model_its_images_and_a_registry_probed_on_them():
    setup = build_setup(
        dc.ModelSpec(device="cpu"), timesteps=[500], images=one_set("a", "synthetic", n=2, seed=0)
    )
    assert set(setup.sets) == {"a"} and len(setup.sets["a"]) == 2 and setup.captions == {"a": None}
    assert len(setup.registry) == 72 and all(
        info.n_keys for info in setup.registry.layers
    )  # probed: keys known
    expected = dc.load_images("synthetic", n=2, size=32, channels=3).images
    np.testing.assert_array_equal(np.asarray(setup.sets["a"].images), expected)
    bare = build_setup(dc.ModelSpec(device="cpu"))  # no images: probed on a zero input
    assert bare.sets == {} and [i.n_keys for i in bare.registry.layers] == [
        i.n_keys for i in setup.registry.layers
    ]
