"""A model folder's JSON files (``models.configfile``): read as the object they hold, or refused in one line that
names the file and where it breaks."""

from __future__ import annotations

import pytest

from diffcircuit import DiffcircuitError
from diffcircuit.models.configfile import read_json


def test_an_object_of_settings_is_read_as_written(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"_class_name": "UNet2DModel", "sample_size": [16, 16], "eta": null}')
    assert read_json(path) == {"_class_name": "UNet2DModel", "sample_size": [16, 16], "eta": None}


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ('{"a": 1,\n  "b": }', "line 2, column 8"),  # the value of "b" is missing
        ('{"a": 1}\n{"b": 2}', "line 2, column 1"),  # a second document after the first
    ],
)
def test_broken_json_is_refused_with_the_file_and_the_place_it_breaks(tmp_path, text, where):
    path = tmp_path / "model_index.json"
    path.write_text(text)
    with pytest.raises(DiffcircuitError) as info:
        read_json(path)
    message = str(info.value)
    assert message.startswith(f"{path} is not valid JSON ({where}:") and "\n" not in message


def test_a_file_that_holds_no_object_or_cannot_be_read_is_refused(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("[1, 2]")
    with pytest.raises(DiffcircuitError, match="holds a JSON list, not an object"):
        read_json(path)
    with pytest.raises(DiffcircuitError, match=f"cannot read {tmp_path / 'missing.json'}"):
        read_json(tmp_path / "missing.json")
    path.write_bytes(b"\xff\xfe{")
    with pytest.raises(DiffcircuitError, match="cannot read"):
        read_json(path)
