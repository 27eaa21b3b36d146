from __future__ import annotations

import pytest

from diffcircuit.protocol.store import atomic_write_bytes


def test_atomic_write_replaces_whole_and_leaves_no_temp_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "f.bin"
    atomic_write_bytes(path, b"old")
    import os

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in path.parent.iterdir()) == ["f.bin"]
