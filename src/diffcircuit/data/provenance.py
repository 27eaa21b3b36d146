"""Which images a model was trained on: the record a training writes, and its overlap with analysed images.

A model folder may hold ``training_data.json`` (``TRAINING_RECORD``), written by ``train-tiny``::

    {"format": "diffcircuit-training-data/1", "complete": true, "image_size": 32,
     "sources": [{"kind": "synthetic", "seed": 0, "namespace": 1953653097, "indices": [0, 10000], ...},
                 {"kind": "photo_crops", "photos": [...], "seed": 0, "namespace": ..., "indices": [0, 10000]},
                 {"kind": "lfw", "which": "faces", "indices": [0, 80]}]}

``indices`` are half-open ranges ``[lo, hi)`` of image indices. ``complete`` is false when some training
data are not known (a fine-tune of weights without a record). ``in_training_set`` counts how many of the
``n`` images a run analyses were training images:

- ``synthetic``: analysed image ``i`` of seed ``s`` is generator ``(s, i)``; a synthetic source of namespace
  0 and seed ``s`` covers the indices it lists, one of another namespace none (``data.synthetic``). Counted
  as the same image whatever its rendering (colour, gray, histogram-matched);
- ``faces`` / ``nonfaces``: LFW rows listed by an ``lfw`` source of that part;
- photo crops are crops of scikit-image's sample photographs, none of which is an LFW image or a synthetic
  image: they count 0;
- an image folder: ``None`` (unknown: a folder's files are not compared with the training sources), and
  ``None`` for every dataset when the model has no complete record (e.g. a hub model).
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["RECORD_FORMAT", "TRAINING_RECORD", "in_training_set", "read_training_record"]

TRAINING_RECORD = "training_data.json"
RECORD_FORMAT = "diffcircuit-training-data/1"


def read_training_record(*folders: Path) -> dict | None:
    """The first ``training_data.json`` found in ``folders`` (a pipeline folder, its network folder), or None."""
    for folder in folders:
        path = Path(folder) / TRAINING_RECORD
        if path.is_file():
            try:
                record = json.loads(path.read_text())
            except ValueError:
                return None  # unreadable: unknown, not zero
            return (
                record
                if isinstance(record, dict) and record.get("format") == RECORD_FORMAT
                else None
            )
    return None


def _covered(ranges: list[tuple[int, int]], n: int) -> int:
    """How many of the indices 0..n-1 lie in the union of half-open ``ranges``."""
    total, reach = 0, 0
    for lo, hi in sorted((max(0, lo), min(n, hi)) for lo, hi in ranges):
        lo = max(lo, reach)
        if hi > lo:
            total, reach = total + hi - lo, hi
    return total


def in_training_set(record: dict | None, spec: str, *, n: int, seed: int = 0) -> int | None:
    """How many of the ``n`` analysed images of ``spec`` (synthetic seed ``seed``) the recorded model trained on."""
    if record is None or not record.get("complete", False):
        return None
    sources = record.get("sources", [])
    if spec == "synthetic":
        ranges = [
            tuple(s["indices"])
            for s in sources
            if s["kind"] == "synthetic" and s.get("namespace", 0) == 0 and s["seed"] == seed
        ]
    elif spec in ("faces", "nonfaces"):
        ranges = [tuple(s["indices"]) for s in sources if s["kind"] == "lfw" and s["which"] == spec]
    else:
        return None
    return _covered(ranges, n)
