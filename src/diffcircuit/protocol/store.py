"""The run directory's files, each written atomically (temporary file in the same folder + rename),
and the shards a long run is split into, so that a killed run resumes where it stopped."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import pandas as pd

from diffcircuit.errors import InputError

__all__ = [
    "Shards",
    "atomic_write_bytes",
    "check_writable",
    "claim_command",
    "claim_directory",
    "encode_part",
    "write_json",
    "write_parquet",
]


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one, with the permissions a
    plain ``open`` would give it (0666 less the umask: colleagues can read a shared run; ``mkstemp`` alone gives 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
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
    return (
        _parquet_bytes(value)
        if part.endswith(".parquet")
        else (json.dumps(value, indent=2) + "\n").encode()
    )


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

    def write(
        self, name: str, encoded: Mapping[str, bytes], seconds: float, where: str = ""
    ) -> None:
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

    def ensure(
        self,
        name: str,
        parts: Sequence[str],
        compute: Callable[[], Mapping[str, object]],
        on_resume: Callable[[], None] | None = None,
    ) -> dict:
        """The shard's parts by name: read from disk, after computing them if any part is missing."""
        if self.done(name, parts):
            self.note_resumed(name)
            if on_resume is not None:
                on_resume()
        else:
            start = time.perf_counter()
            values = compute()
            self.write(
                name,
                {part: encode_part(part, values[part]) for part in parts},
                time.perf_counter() - start,
            )
        return self.read(name, parts)

    def frames(
        self,
        name: str,
        parts: Sequence[str],
        compute: Callable[[], Sequence[pd.DataFrame]],
        on_resume: Callable[[], None] | None = None,
    ) -> list[pd.DataFrame]:
        """``ensure`` for a shard of tables given by bare part names, as a list in ``parts`` order."""
        files = [f"{part}.parquet" for part in parts]
        got = self.ensure(name, files, lambda: dict(zip(files, compute(), strict=True)), on_resume)
        return [got[f] for f in files]


LOCK_NAME = ".diffcircuit.lock"


@contextmanager
def claim_directory(out_dir: Path, what: str = "run") -> Iterator[Path]:
    """Hold ``out_dir`` for this process while the ``with`` block runs: an exclusive lock on a file in it, taken
    at once or refused in one line (another command is writing there), released when the block ends or the
    process dies. A directory that cannot be created or written is refused in one line too."""
    import fcntl

    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(out_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise InputError(
            f"cannot write to {out_dir}: {exc.strerror or exc}; choose another output directory"
        ) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(
                f"{out_dir} is in use by another diffcircuit {what} (it holds {LOCK_NAME}); wait "
                "for it to finish or choose another output directory"
            ) from None
        if not os.access(out_dir, os.W_OK | os.X_OK):
            raise InputError(
                f"cannot write to {out_dir}: permission denied; choose another output directory"
            )
        yield out_dir
    finally:
        os.close(fd)  # closing the descriptor releases the lock


_RECORDS = (
    "run.json",
    "ablate.json",
    "discover.json",
)  # the file with which each command claims its directory


@contextmanager
def claim_command(
    out_dir: Path, command: str, config: dict, *, ignore: Collection[str] = ()
) -> Iterator[bool]:
    """``claim_directory`` for a command that writes ``<command>.json`` (its config) first: a directory holding
    another command's results, or this command's with another config (compared without the ``ignore`` keys:
    settings that do not change results, such as the batch size or the device), is refused. Yields whether
    the directory already holds this command's finished results for this config: the caller may read them
    back instead of computing them again (a resume); otherwise it computes them and writes its record."""
    config = json.loads(json.dumps(config))  # as it reads back: tuples become lists

    def key(values: dict | None) -> dict | None:
        return None if values is None else {k: v for k, v in values.items() if k not in ignore}

    with claim_directory(out_dir, command):
        record = Path(out_dir) / f"{command}.json"
        other = [
            name for name in _RECORDS if name != record.name and (Path(out_dir) / name).exists()
        ]
        if other:
            raise InputError(
                f"{out_dir} holds the results of another command ({other[0]}); choose another output "
                "directory"
            )
        finished = False
        if record.exists():
            try:
                old = json.loads(record.read_text())
            except ValueError:
                old = {}
            if key(old.get("config")) != key(config):
                raise InputError(
                    f"{out_dir} holds a {command} with a different config ({record.name}); choose "
                    "another output directory"
                )
            finished = bool(old.get("finished"))
        else:
            write_json(record, {"config": config, "finished": False})
        yield finished


def check_writable(path: Path) -> None:
    """Refuse, before any work, an output ``path`` that could not be written: its nearest existing ancestor must be a
    directory this process may write into (nothing is created here)."""
    path = Path(path).absolute()
    ancestor = next(p for p in (path, *path.parents) if p.exists())
    if ancestor == path and path.is_dir() and os.access(path, os.W_OK | os.X_OK):
        return
    if not ancestor.is_dir():
        raise InputError(f"cannot write to {path}: {ancestor} is a file, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise InputError(f"cannot write to {path}: permission denied in {ancestor}")
