"""The local backend (``protocol.backends``): every missing shard computed once, in this process, written whole
through the shard store; shards already on disk resumed, not recomputed; progress reported for each.
(The Ray backend against it, bit for bit: ``tests/integration/test_ray.py``.)"""

from __future__ import annotations

import json
import logging

import pandas as pd
import pytest

from diffcircuit import RunConfig
from diffcircuit.protocol import backends
from diffcircuit.protocol.backends import LocalBackend, make_backend
from diffcircuit.protocol.store import Shards
from diffcircuit.protocol.tasks import Context, compute, observe_tasks


@pytest.fixture(scope="module")
def ctx(small_model_dir_module):
    cfg = RunConfig(
        model=str(small_model_dir_module),
        n=3,
        timesteps=(20,),
        batch_size=2,
        seed=3,
        shard_images=1,
        role_null_block=2,
        ablate_n=2,
    )
    return Context.build(cfg)


def _run(ctx, tasks, root, monkeypatch):
    """Run the local backend; return the shard store, the tasks it computed and the progress it reported."""
    computed, reported = [], {}

    def counting(ctx, task, progress=None):
        computed.append(task.name)
        return compute(ctx, task, progress)

    def progress(task, k):
        reported[task.name] = reported.get(task.name, 0) + k

    monkeypatch.setattr(backends, "compute", counting)
    shards = Shards(root)
    backend = make_backend(ctx, logging.getLogger("test"))
    assert isinstance(backend, LocalBackend)
    backend.run(tasks, shards, progress)
    backend.close()
    return shards, computed, reported


def test_each_missing_shard_is_computed_once_and_whole_shards_are_resumed(
    ctx, tmp_path, monkeypatch
):
    tasks = observe_tasks(ctx, seed=3)
    # two datasets x one timestep x null blocks 0-2, 2-3 of three images
    assert [t.name for t in tasks] == [
        "observe_s3_a_t20_0-2",
        "observe_s3_a_t20_2-3",
        "observe_s3_b_t20_0-2",
        "observe_s3_b_t20_2-3",
    ]
    shards, computed, reported = _run(ctx, tasks, tmp_path, monkeypatch)
    assert computed == [t.name for t in tasks] and (shards.computed, shards.resumed) == (4, 0)
    assert reported == {t.name: t.units for t in tasks}  # each shard's images, all reported
    for task in tasks:
        assert all((tmp_path / f"{task.name}.{part}").exists() for part in task.files)
        cost = json.loads((tmp_path / f"{task.name}.cost.json").read_text())
        assert cost["image_forwards"] == task.units  # one forward per image at one timestep
    first = pd.read_parquet(tmp_path / f"{tasks[1].name}.heads.parquet")
    assert sorted(first.image.unique()) == [2] and set(first.dataset) == {"a"}

    (tmp_path / f"{tasks[1].name}.images.parquet").unlink()  # a shard killed before its last part
    shards, computed, reported = _run(ctx, tasks, tmp_path, monkeypatch)
    assert computed == [tasks[1].name] and (shards.computed, shards.resumed) == (1, 3)
    assert reported == {t.name: t.units for t in tasks}
    pd.testing.assert_frame_equal(
        pd.read_parquet(tmp_path / f"{tasks[1].name}.heads.parquet"), first
    )  # recomputed as before
    assert (tmp_path / f"{tasks[1].name}.images.parquet").exists()

    shards, computed, _ = _run(ctx, tasks, tmp_path, monkeypatch)
    assert computed == [] and (shards.computed, shards.resumed) == (0, 4)
