"""The run directory's files, each written atomically (temporary file in the same folder + rename)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pandas as pd

__all__ = ["atomic_write_bytes", "write_json", "write_parquet"]


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
