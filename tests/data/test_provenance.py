"""Training records and how many analysed images a model was trained on."""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path

import tomllib

from diffcircuit.data.provenance import RECORD_FORMAT, in_training_set, read_training_record

EMBEDDED = (
    Path(__file__).resolve().parents[2]
    / "src"
    / "diffcircuit"
    / "models"
    / "embedded"
    / "tiny-ddpm-32"
)


def test_the_shipped_model_never_trained_on_an_analysed_image():
    record = read_training_record(EMBEDDED)
    assert record is not None and record["complete"] and record["composition"] == "disjoint"
    assert {s["kind"] for s in record["sources"]} == {"synthetic", "photo_crops"}
    for spec in ("faces", "nonfaces"):
        assert in_training_set(record, spec, n=100) == 0
    for seed in (0, 1, 1_000_003):  # 1,000,003: the old recipe's pool, no longer trained on
        assert in_training_set(record, "synthetic", n=2000, seed=seed) == 0
    assert in_training_set(record, "/some/folder", n=10) is None


def test_the_record_ships_with_the_package():
    globs = tomllib.loads((EMBEDDED.parents[4] / "pyproject.toml").read_text())["tool"][
        "setuptools"
    ]["package-data"]["diffcircuit"]
    assert any(fnmatch.fnmatch("models/embedded/tiny-ddpm-32/training_data.json", g) for g in globs)


def test_counts_take_the_union_of_ranges_and_unknowns_are_none(tmp_path):
    sources = [
        {"kind": "lfw", "which": "faces", "indices": [0, 10]},
        {"kind": "lfw", "which": "faces", "indices": [5, 20]},
        {"kind": "lfw", "which": "faces", "indices": [50, 60]},
        {"kind": "synthetic", "seed": 0, "namespace": 12345, "indices": [0, 10_000]},
    ]
    record = {"format": RECORD_FORMAT, "complete": True, "sources": sources}
    assert in_training_set(record, "faces", n=100) == len(set(range(20)) | set(range(50, 60)))
    assert in_training_set(record, "faces", n=55) == 25
    assert (
        in_training_set(record, "synthetic", n=100, seed=0) == 0
    )  # another namespace: never an analysed image
    assert in_training_set(record | {"complete": False}, "faces", n=100) is None
    assert in_training_set(None, "faces", n=100) is None
    (tmp_path / "training_data.json").write_text(json.dumps(record))
    assert read_training_record(tmp_path / "nowhere", tmp_path) == record
    (tmp_path / "training_data.json").write_text("{not json")
    assert read_training_record(tmp_path) is None
