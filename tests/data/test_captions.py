"""Image folders with captions: captions.csv or captions.jsonl, one caption per image, matched by file name."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from diffcircuit import DiffcircuitError, load_images


def _folder(root, names):
    (root / "sub").mkdir(parents=True)
    for i, name in enumerate(names):
        Image.fromarray(np.full((12, 12, 3), 40 * i, dtype=np.uint8)).save(root / name)
    return root


def test_captions_from_csv_and_jsonl_follow_the_images_order(tmp_path):
    names = ["b.png", "a.png", "sub/c.png"]
    csv = _folder(tmp_path / "csv", names)
    (csv / "captions.csv").write_text(
        'file,caption\nsub/c.png,"a cat, sitting"\na.png,an apple\nb.png,a bee\n'
    )
    images = load_images(str(csv), n=3, size=8, channels=3)
    assert images.names == ("a.png", "b.png", "sub/c.png")  # sorted paths
    assert images.captions == ("an apple", "a bee", "a cat, sitting")
    jsonl = _folder(tmp_path / "jsonl", names)
    (jsonl / "captions.jsonl").write_text(
        "\n".join(json.dumps({"file": n, "caption": n.upper()}) for n in names) + "\n"
    )
    assert load_images(str(jsonl), n=2, size=8, channels=3).captions == ("A.PNG", "B.PNG")
    plain = _folder(tmp_path / "plain", names)
    assert load_images(str(plain), n=3, size=8, channels=3).captions is None


def test_captions_change_the_fingerprint(tmp_path):
    folder = _folder(tmp_path / "f", ["a.png"])
    (folder / "captions.csv").write_text("file,caption\na.png,one\n")
    first = load_images(str(folder), n=1, size=8, channels=3).fingerprint
    (folder / "captions.csv").write_text("file,caption\na.png,two\n")
    assert load_images(str(folder), n=1, size=8, channels=3).fingerprint != first


@pytest.mark.parametrize(
    "files, message",
    [
        ({"captions.csv": "file,caption\na.png,x\n"}, "no caption for b.png"),
        ({"captions.csv": "name,text\na.png,x\n"}, "columns 'file' and 'caption'"),
        ({"captions.jsonl": '{"file": "a.png"}\n'}, "line 1 is not an object"),
        ({"captions.csv": "file,caption\n", "captions.jsonl": ""}, "keep one"),
    ],
)
def test_bad_caption_files_are_refused_in_one_line(tmp_path, files, message):
    folder = _folder(tmp_path / "f", ["a.png", "b.png"])
    for name, text in files.items():
        (folder / name).write_text(text)
    with pytest.raises(DiffcircuitError, match=message):
        load_images(str(folder), n=2, size=8, channels=3)
