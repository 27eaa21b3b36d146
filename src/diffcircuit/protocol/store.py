"""The run directory's files, each written atomically (temporary file in the same folder + rename),
and the shards a long run is split into, so that a killed run resumes where it stopped."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import pandas as pd

__all__ = ["Shards", "atomic_write_bytes", "encode_part", "write_json", "write_parquet"]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def _parquet_bytes(frame: pd.DataFrame) -> bytes:
    import io

    buf = io.BytesIO()
    frame.to_parquet(buf, index=False, engine="pyarrow")
    return buf.getvalue()


def write_parquet(path: Path, frame: pd.DataFrame) -> None:
    atomic_write_bytes(path, _parquet_bytes(frame))


def encode_part(part: str, value) -> bytes:
    """A shard part's bytes: a table as Parquet (``*.parquet``), anything else as JSON."""
    return _parquet_bytes(value) if part.endswith(".parquet") else (json.dumps(value, indent=2) + "\n").encode()


def _read_part(path: Path):
    return pd.read_parquet(path) if path.suffix == ".parquet" else json.loads(path.read_text())


class Shards:
    """Finished pieces of a run under ``root``: a shard is a few named parts, done when all exist.

    ``ensure(name, parts, compute)`` returns the shard's parts, computing and writing them (each
    atomically) only when some part is missing, then reading them back from disk, so a fresh and a
    resumed run process exactly the same bytes. A run killed at any moment loses at most the shards
    it was computing; everything the shards feed is recomputed from them at the end. Parts ending in
    ``.parquet`` are tables; others are JSON.
    """

    def __init__(self, root: Path, log: logging.Logger | None = None):
        self.root = Path(root)
        self.log = log or logging.getLogger("diffcircuit")
        self.computed = self.resumed = 0

    def path(self, name: str, part: str) -> Path:
        return self.root / f"{name}.{part}"

    def done(self, name: str, parts: Sequence[str]) -> bool:
        return all(self.path(name, part).exists() for part in parts)

    def write(self, name: str, encoded: Mapping[str, bytes], seconds: float, where: str = "") -> None:
        """Store a computed shard's parts (already encoded, ``encode_part``), each atomically."""
        for part, data in encoded.items():
            atomic_write_bytes(self.path(name, part), data)
        self.computed += 1
        self.log.info("shard %s: computed in %.1f s%s", name, seconds, where)

    def read(self, name: str, parts: Sequence[str]) -> dict:
        return {part: _read_part(self.path(name, part)) for part in parts}

    def note_resumed(self, name: str) -> None:
        self.resumed += 1
        self.log.info("shard %s: resumed from disk", name)

    def ensure(self, name: str, parts: Sequence[str], compute: Callable[[], Mapping[str, object]],
               on_resume: Callable[[], None] | None = None) -> dict:
        """The shard's parts by name: read from disk, after computing them if any part is missing."""
        if self.done(name, parts):
            self.note_resumed(name)
            if on_resume is not None:
                on_resume()
        else:
            start = time.perf_counter()
            values = compute()
            self.write(name, {part: encode_part(part, values[part]) for part in parts}, time.perf_counter() - start)
        return self.read(name, parts)

    def frames(self, name: str, parts: Sequence[str], compute: Callable[[], Sequence[pd.DataFrame]],
               on_resume: Callable[[], None] | None = None) -> list[pd.DataFrame]:
        """``ensure`` for a shard of tables given by bare part names, as a list in ``parts`` order."""
        files = [f"{part}.parquet" for part in parts]
        got = self.ensure(name, files, lambda: dict(zip(files, compute(), strict=True)), on_resume)
        return [got[f] for f in files]
