"""Captions for an image folder: image-prompt pairs for text-conditioned models.

A folder may hold ``captions.csv`` (a header naming the columns ``file`` and ``caption``) or
``captions.jsonl`` (one object per line with ``file`` and ``caption``). ``file`` is the image's path
relative to the folder, as ``folder_images`` names it. Every image analysed needs a caption; a folder
with neither file has none (and a text-conditioned model then gets the run's prompt for it).
"""

from __future__ import annotations

import json
from pathlib import Path

from diffcircuit.errors import InputError

__all__ = ["CAPTION_FILES", "captions_for", "read_captions"]

CAPTION_FILES = ("captions.csv", "captions.jsonl")


def _from_csv(path: Path) -> dict[str, str]:
    import pandas as pd

    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as exc:  # malformed CSV, bad encoding
        raise InputError(f"cannot read {path}: {str(exc).splitlines()[0]}") from None
    if not {"file", "caption"} <= set(table.columns):
        raise InputError(
            f"{path} needs a header with the columns 'file' and 'caption', not {list(table.columns)}"
        )
    return dict(zip(table["file"], table["caption"]))


def _from_jsonl(path: Path) -> dict[str, str]:
    out = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            out[str(record["file"])] = str(record["caption"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise InputError(
                f"{path} line {number} is not an object with 'file' and 'caption'"
            ) from None
    return out


def read_captions(folder: Path) -> dict[str, str] | None:
    """``{file: caption}`` from the folder's caption file, or None when it has none."""
    found = [folder / name for name in CAPTION_FILES if (folder / name).is_file()]
    if len(found) > 1:
        raise InputError(f"{folder} has both {CAPTION_FILES[0]} and {CAPTION_FILES[1]}; keep one")
    if not found:
        return None
    return _from_csv(found[0]) if found[0].suffix == ".csv" else _from_jsonl(found[0])


def captions_for(folder: Path, names: list[str] | tuple[str, ...]) -> tuple[str, ...] | None:
    """The caption of each image ``names`` (paths relative to ``folder``), or None without a caption file."""
    table = read_captions(folder)
    if table is None:
        return None
    missing = [n for n in names if n not in table]
    if missing:
        raise InputError(
            f"no caption for {missing[0]} in {folder}'s caption file"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    return tuple(table[n] for n in names)
