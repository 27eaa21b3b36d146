"""Data specs (``data.spec``): the built-in sets and their limits."""

from __future__ import annotations

import pytest

from diffcircuit import DiffcircuitError, load_images


def test_builtin_specs_and_limits():
    s = load_images("synthetic", n=5, size=16, channels=3)
    assert len(s) == 5 and s.masks is not None and s.masks.shape == (5, 16, 16)
    f = load_images("faces", n=7, size=32, channels=1)
    assert f.images.shape == (7, 1, 32, 32) and f.masks is None
    with pytest.raises(DiffcircuitError, match="100"):
        load_images("faces", n=101, size=32, channels=3)
    with pytest.raises(DiffcircuitError, match="not one of"):
        load_images("no-such-spec", n=1, size=32, channels=3)
