"""The run directory's files, each written atomically (temporary file in the same folder + rename),
and the shards a long run is split into, so that a killed run resumes where it stopped."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd

__all__ = ["Shards", "atomic_write_bytes", "write_json", "write_parquet"]


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


def write_parquet(path: Path, frame: pd.DataFrame) -> None:
    import io

    buf = io.BytesIO()
    frame.to_parquet(buf, index=False, engine="pyarrow")
    atomic_write_bytes(path, buf.getvalue())


class Shards:
    """Finished pieces of a run under ``root``: a shard is a few named files, done when all exist.

    ``frames(name, parts, compute)`` returns the shard's tables, computing and writing them (each
    atomically) only when some file is missing, then reading them back from disk, so a fresh and a
    resumed run process exactly the same bytes. A run killed at any moment loses at most the shards
    it was computing; everything the shards feed is recomputed from them at the end.
    """

    def __init__(self, root: Path, log: logging.Logger | None = None):
        self.root = Path(root)
        self.log = log or logging.getLogger("diffcircuit")
        self.computed = self.resumed = 0

    def _paths(self, name: str, parts: Sequence[str], suffix: str) -> list[Path]:
        return [self.root / f"{name}.{part}{suffix}" for part in parts]

    def _done_or_compute(self, name: str, paths: Sequence[Path], compute: Callable[[], None],
                         on_resume: Callable[[], None] | None) -> None:
        if all(p.exists() for p in paths):
            self.resumed += 1
            self.log.info("shard %s: resumed from disk", name)
            if on_resume is not None:
                on_resume()
            return
        start = time.perf_counter()
        compute()
        self.computed += 1
        self.log.info("shard %s: computed in %.1f s", name, time.perf_counter() - start)

    def frames(self, name: str, parts: Sequence[str], compute: Callable[[], Sequence[pd.DataFrame]],
               on_resume: Callable[[], None] | None = None) -> list[pd.DataFrame]:
        paths = self._paths(name, parts, ".parquet")

        def write() -> None:
            for path, frame in zip(paths, compute(), strict=True):
                write_parquet(path, frame)

        self._done_or_compute(name, paths, write, on_resume)
        return [pd.read_parquet(p) for p in paths]

    def frame(self, name: str, compute: Callable[[], pd.DataFrame], on_resume: Callable[[], None] | None = None) -> pd.DataFrame:
        return self.frames(name, ["table"], lambda: [compute()], on_resume)[0]

    def json(self, name: str, compute: Callable[[], object], on_resume: Callable[[], None] | None = None):
        path = self.root / f"{name}.json"
        self._done_or_compute(name, [path], lambda: write_json(path, compute()), on_resume)
        return json.loads(path.read_text())
