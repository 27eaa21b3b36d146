from __future__ import annotations

import pandas as pd
import pytest

from diffcircuit.protocol.store import Shards, atomic_write_bytes, encode_part


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


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_get_the_permissions_the_umask_gives(tmp_path, umask, mode):
    import os
    import stat

    old = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "f.json", b"{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f.json").stat().st_mode) == mode


def test_a_directory_is_claimed_by_one_process_at_a_time(tmp_path):
    from diffcircuit import DiffcircuitError
    from diffcircuit.protocol.store import claim_directory

    with claim_directory(tmp_path / "out"):
        with pytest.raises(DiffcircuitError, match="in use by another diffcircuit run"):
            with claim_directory(tmp_path / "out"):
                pass
    with claim_directory(tmp_path / "out"):  # released when the first claim ended
        pass
    (tmp_path / "file").write_text("x")
    with pytest.raises(DiffcircuitError, match="cannot write to"):
        with claim_directory(tmp_path / "file" / "out"):
            pass


def test_a_command_claims_its_directory_with_its_config(tmp_path):
    import json

    from diffcircuit import DiffcircuitError
    from diffcircuit.protocol.store import claim_command

    with claim_command(tmp_path, "ablate", {"n": 2, "timesteps": (500,)}):
        assert json.loads((tmp_path / "ablate.json").read_text())["config"] == {
            "n": 2,
            "timesteps": [500],
        }
    with claim_command(tmp_path, "ablate", {"n": 2, "timesteps": (500,)}) as finished:
        assert not finished  # the same config, unfinished: it runs again
    record = json.loads((tmp_path / "ablate.json").read_text())
    (tmp_path / "ablate.json").write_text(json.dumps(record | {"finished": True}))
    with claim_command(tmp_path, "ablate", {"n": 2, "timesteps": (500,)}) as finished:
        assert finished  # finished: the caller reads its results back
    with claim_command(
        tmp_path, "ablate", {"n": 2, "timesteps": [500], "batch_size": 8}, ignore=("batch_size",)
    ) as finished:
        assert finished  # a setting that changes no result is not another config
    with pytest.raises(DiffcircuitError, match="different config"):
        with claim_command(tmp_path, "ablate", {"n": 3, "timesteps": (500,)}):
            pass
    with pytest.raises(DiffcircuitError, match="another command"):
        with claim_command(tmp_path, "discover", {"n": 2}):
            pass


def test_a_shard_is_resumed_only_when_every_part_is_on_disk(tmp_path):
    """A run killed between two parts of a shard leaves it unfinished: the next run recomputes it; a
    finished shard is read back without computing."""
    shards = Shards(tmp_path)
    table = pd.DataFrame({"x": [1.0, 2.0]})
    calls = []

    def compute():
        calls.append(1)
        return {"table.parquet": table, "cost.json": {"seconds": 1.0}}

    parts = ("table.parquet", "cost.json")
    atomic_write_bytes(shards.path("s", "table.parquet"), encode_part("table.parquet", table))
    got = shards.ensure("s", parts, compute)  # only the first part was written: recomputed
    assert len(calls) == 1 and (shards.computed, shards.resumed) == (1, 0)
    pd.testing.assert_frame_equal(got["table.parquet"], table)
    assert got["cost.json"] == {"seconds": 1.0}
    again = Shards(tmp_path).ensure("s", parts, compute)  # whole: read back, not computed
    assert len(calls) == 1 and again["cost.json"] == {"seconds": 1.0}
