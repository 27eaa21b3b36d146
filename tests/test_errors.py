"""Errors name what was wrong in the library's terms; the CLI names flags."""

from __future__ import annotations

from diffcircuit.errors import ConfigError, DiffcircuitError


def test_a_config_error_names_its_fields_as_flags_only_where_they_are_words():
    err = ConfigError("need n >= 2 and batch_size >= 1 (n images, not 'n')", "n", "batch_size")
    assert isinstance(err, DiffcircuitError) and isinstance(err, ValueError)
    assert err.with_flags() == "need --n >= 2 and --batch-size >= 1 (--n images, not 'n')"
    assert (
        ConfigError("names or levels", "names", "levels").with_flags(
            {"names": "--target", "levels": "--level"}
        )
        == "--target or --level"
    )
    assert (
        ConfigError("ablate_n is 0", "n").with_flags() == "ablate_n is 0"
    )  # n inside another word stays
