"""A run's shards (``protocol.tasks``): names, units and estimated work of each stage's tasks for a small config,
worked out by hand; the ablation plan against the registry (every head once, distinct layers and blocks, all
heads, random sets of each size and as many as ``null_set_counts`` documents); mean ablation's reference
images; and a shard computed under autocast."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from diffcircuit import ImageSet, RunConfig, probe_registry
from diffcircuit.interventions import Target, targets
from diffcircuit.protocol.tasks import (
    ATTRIBUTION_ESTIMATORS,
    WORK,
    Context,
    ablate_tasks,
    ablation_plan,
    attribute_tasks,
    compute,
    discover_tasks,
    null_set_counts,
    observe_tasks,
    patch_tasks,
)

# the small UNet's attention layers and their heads; its blocks down_blocks.0, down_blocks.1 and mid_block
# are one layer each, up_blocks.0 two layers of 4 heads (8), up_blocks.1 two layers of 2 heads (4)
LAYERS = {
    "down_blocks.0.attentions.0": 2,
    "down_blocks.1.attentions.0": 4,
    "mid_block.attentions.0": 4,
    "up_blocks.0.attentions.0": 4,
    "up_blocks.0.attentions.1": 4,
    "up_blocks.1.attentions.0": 2,
    "up_blocks.1.attentions.1": 2,
}
N_HEADS = sum(LAYERS.values())  # 22


@pytest.fixture
def registry(small_unet):
    return probe_registry(small_unet, torch.zeros(1, 3, 16, 16), torch.zeros(1, dtype=torch.long))


def _set(n: int, offset: float) -> ImageSet:
    images = (np.arange(n, dtype=np.float32)[:, None, None, None] + offset) * np.ones(
        (1, 3, 4, 4), np.float32
    )
    return ImageSet(spec="test", images=images, names=tuple(str(i) for i in range(n)))


def _context(registry, sizes=(10, 7), **fields) -> Context:
    """A context without a model: ``cfg`` (a small config and ``fields``), the registry, images a and b."""
    cfg = RunConfig(
        **(
            dict(
                n=10,
                timesteps=(100, 700),
                shard_images=4,
                role_null_block=2,
                ablate_n=4,
                null_sets=5,
                circuit_resamples=3,
                ablation_methods=("zero", "mean", "resample"),
            )
            | fields
        )
    )
    return Context(
        cfg=cfg,
        den=None,
        registry=registry,
        sets={"a": _set(sizes[0], 0.0), "b": _set(sizes[1], 100.0)},
    )


def test_registry_is_the_small_unets(registry):
    assert {i.layer: i.heads for i in registry.layers} == LAYERS and len(list(registry)) == N_HEADS


def test_observation_shards_are_whole_null_blocks_of_at_least_shard_images(registry):
    ctx = _context(registry)
    tasks = observe_tasks(ctx, seed=3)
    # 10 images in blocks of 2, shards of >= 4: 0-4, 4-8, 8-10; 7 images: blocks 0-2, 2-4, 4-6, 6-7: 0-4, 4-7
    slices = {"a": [(0, 4), (4, 8), (8, 10)], "b": [(0, 4), (4, 7)]}
    expected = [
        f"observe_s3_{key}_t{t}_{lo}-{hi}"
        for key in "ab"
        for t in (100, 700)
        for lo, hi in slices[key]
    ]
    assert [t.name for t in tasks] == expected
    assert [t.units for t in tasks] == [
        hi - lo for key in "ab" for _ in (100, 700) for lo, hi in slices[key]
    ]
    assert all(
        t.work == t.units * 1.0 and t.parts == ("heads.parquet", "images.parquet") for t in tasks
    )
    assert all(t.files == (*t.parts, "cost.json") and t.label == "observe" for t in tasks)
    with_null = observe_tasks(ctx, seed=3, null=True, label="null")
    assert [t.name for t in with_null] == expected
    assert all(
        t.work == 5.0 * t.units and t.parts[-1] == "null.parquet" and t.label == "null"
        for t in with_null
    )
    assert with_null[0].args == dict(key="a", t=100, seed=3, lo=0, hi=4, null=True)


def test_intervention_and_discovery_tasks_and_their_work(registry):
    ctx = _context(registry)
    plan, _ = ablation_plan(registry, null_sets=5, seed=0)
    ablate = ablate_tasks(ctx)
    assert [t.name for t in ablate] == [
        "ablate_a_t100",
        "ablate_a_t700",
        "ablate_b_t100",
        "ablate_b_t700",
    ]
    # 4 images x every planned target x 3 methods, 0.65 image forwards each
    assert all(t.units == 4 and t.work == pytest.approx(4 * len(plan) * 3 * 0.65) for t in ablate)
    patch = patch_tasks(ctx)
    assert [t.name for t in patch] == ["patch_t100", "patch_t700"]
    assert all(t.work == pytest.approx(4 * (N_HEADS + len(LAYERS)) * 0.5) for t in patch)
    attribute = attribute_tasks(ctx)  # zero and mean only (not resample), three estimators each
    assert [t.name for t in attribute] == [
        f"attribute_{key}_{method}_{options}"
        for key in "ab"
        for method in ("zero", "mean")
        for options in ("ig_steps0", "ig_steps4", "probes1")
    ]
    steps = [0, 4, 0] * 4
    assert [t.work for t in attribute] == pytest.approx([4 * 2 * 1.5 * (1 + s) for s in steps])
    importance = pd.DataFrame({"timestep": [100, 700, 700], "target": ["x", "y", "z"]})
    discover = discover_tasks(ctx, importance)
    assert [t.name for t in discover] == ["discover_t100", "discover_t700"]
    assert list(discover[1].args["importance"].target) == ["y", "z"]  # each timestep's own ranking
    # (1.2 + 0.17 per resample) per head and image, 4 images, both datasets
    assert all(
        t.units == 2 and t.work == pytest.approx((1.2 + 0.17 * 3) * N_HEADS * 4 * 2)
        for t in discover
    )
    assert set(WORK) >= {"observe", "observe_null", "ablate", "patch", "attribute", "discover"}
    assert ATTRIBUTION_ESTIMATORS[1] == dict(ig_steps=4)


def test_null_set_counts_reach_significance_over_each_level():
    """At least null_sets sets, and at least 20·m for a size that m components of a level use."""

    def target(level, size, name):
        return Target(level=level, name=name, heads=tuple(range(size)))

    plan = (
        [target("head", 1, f"h{i}") for i in range(9)]  # heads need no null sets
        + [target("layer", 4, f"l{i}") for i in range(3)]
        + [target("block", 8, "b0"), target("block", 4, "b1")]
    )
    assert null_set_counts(plan, 5) == {4: 60, 8: 40}  # 4: 3 layers (60) beat 2 blocks (40)
    assert null_set_counts(plan, 100) == {4: 100, 8: 100}
    assert null_set_counts([target("head", 1, "h")], 5) == {}


def test_the_plan_ablates_every_head_once_every_distinct_layer_and_block_all_heads_and_random_sets(
    registry,
):
    plan, aliases = ablation_plan(registry, null_sets=5, seed=0)
    by_level = {
        level: [t for t in plan if t.level == level]
        for level in ("head", "layer", "block", "all", "random")
    }
    assert sorted(str(t.heads[0]) for t in by_level["head"]) == sorted(
        f"{layer}:{h}" for layer, n in LAYERS.items() for h in range(n)
    )
    assert [t.name for t in by_level["layer"]] == list(LAYERS)
    assert [t.name for t in by_level["block"]] == [
        "up_blocks.0",
        "up_blocks.1",
    ]  # the others are one layer
    assert aliases == {
        "down_blocks.0.attentions.0": ("down_blocks.0",),
        "down_blocks.1.attentions.0": ("down_blocks.1",),
        "mid_block.attentions.0": ("mid_block",),
    }
    assert [len(t.heads) for t in by_level["all"]] == [N_HEADS]
    # sizes 2 and 4 (7 layers: 140 sets each) and 8 (2 blocks: 40 sets); 4 is also a block's size
    sizes = pd.Series([len(t.heads) for t in by_level["random"]]).value_counts().to_dict()
    assert sizes == {2: 140, 4: 140, 8: 40}
    assert all(len(set(t.heads)) == len(t.heads) for t in by_level["random"])
    assert len(plan) == N_HEADS + 7 + 2 + 1 + 320
    again, _ = ablation_plan(registry, null_sets=5, seed=0)
    other, _ = ablation_plan(registry, null_sets=5, seed=1)
    assert again == plan and [t.heads for t in other] != [t.heads for t in plan]


def test_the_plan_tests_a_block_that_is_one_layer_once(small_unet):
    registry = probe_registry(
        small_unet, torch.zeros(1, 3, 16, 16), torch.zeros(1, dtype=torch.long)
    )
    plan, aliases = ablation_plan(registry, null_sets=5, seed=0)
    layers = {t.name: frozenset(t.heads) for t in targets(registry, "layer")}
    for block in targets(registry, "block"):
        same = [name for name, heads in layers.items() if heads == frozenset(block.heads)]
        assert (block.name in [t.name for t in plan]) == (not same)
        assert not same or aliases[same[0]] == (block.name,)
    named = [t for t in plan if t.level in ("layer", "block")]
    for size in {len(t.heads) for t in named}:
        m = max(
            sum(t.level == lv for t in named)
            for lv in ("layer", "block")
            if any(t.level == lv and len(t.heads) == size for t in named)
        )
        sets = [t for t in plan if t.level == "random" and len(t.heads) == size]
        assert (
            len(sets) == max(5, 20 * m) and 1 / (len(sets) + 1) * m < 0.05
        )  # a lone component can reach q < 0.05
    assert {len(t.heads) for t in plan if t.level == "random"} == {len(t.heads) for t in named}
    assert [t.name for t in plan if t.level == "all"] == ["all_heads"]


def test_mean_ablations_reference_images_are_held_out_pooled_or_in_sample(registry):
    ctx = _context(registry, sizes=(10, 10))  # 10 images each, the first 4 evaluated
    (held,) = ctx.references("b")
    assert held.dataset == "b" and list(held.index) == [4, 5, 6, 7]
    assert np.array_equal(
        held.images[:, 0, 0, 0], [104.0, 105.0, 106.0, 107.0]
    )  # the next four of b
    pooled = _context(registry, (10, 10), mean_reference="pooled").references("a")
    assert [(r.dataset, list(r.index)) for r in pooled] == [
        ("a", [4, 5, 6, 7]),
        ("b", [4, 5, 6, 7]),
    ]
    assert np.array_equal(pooled[1].images[:, 0, 0, 0], [104.0, 105.0, 106.0, 107.0])
    assert _context(registry, mean_reference="insample").references("a") is None
    (fewer,) = _context(registry, (6, 6), n=6).references("a")  # n < 2·ablate_n: what is left
    assert list(fewer.index) == [4, 5] and np.array_equal(fewer.images[:, 0, 0, 0], [4.0, 5.0])


def _small_config(model_dir, **kw) -> RunConfig:
    return RunConfig(
        model=str(model_dir),
        n=3,
        timesteps=(20, 800),
        batch_size=2,
        seed=3,
        ablate_n=2,
        circuit_resamples=2,
        **kw,
    )


def test_bf16_autocast_changes_the_forward_but_keeps_statistics_fp32_and_close(
    small_model_dir_module,
):
    full = Context.build(_small_config(small_model_dir_module))
    half = Context.build(_small_config(small_model_dir_module, precision="bf16"))
    task = observe_tasks(full, seed=3)[0]
    a, b = compute(full, task)["heads.parquet"], compute(half, task)["heads.parquet"]
    assert (a.entropy_nats.dtype, b.entropy_nats.dtype) == (np.float64, np.float64)
    assert not np.array_equal(
        a.entropy_nats, b.entropy_nats
    )  # autocast really ran the network in bf16
    np.testing.assert_allclose(
        b.entropy_nats, a.entropy_nats, atol=0.05
    )  # nats; bf16 keeps 8 bits of mantissa
    ia, ib = compute(full, task)["images.parquet"], compute(half, task)["images.parquet"]
    np.testing.assert_allclose(ib.eps_mse, ia.eps_mse, rtol=0.1)
    swept = compute(half, ablate_tasks(half)[0])[
        "table.parquet"
    ]  # interventions run under autocast too
    assert np.isfinite(swept.degradation_pct).all()
