"""``protocol.roles``: the role null's shards and blocks, and its tests over heads (planted rows, scipy's bootstrap
and statsmodels' correction as the references)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from diffcircuit.protocol.roles import null_blocks, shard_slices


def test_role_tests_sum_the_shards_nulls_and_resample_every_head_at_once():
    """``protocol.roles.role_tests_table`` on planted rows: each unit's p is the matched-pairing p of its shards'
    summed permutation excesses (computed here directly), its interval scipy's percentile bootstrap of its excess
    over images (2,000 resamples, seed 0), its q Benjamini–Hochberg over the heads."""
    import pytest
    from scipy import stats
    from statsmodels.stats.multitest import multipletests

    from diffcircuit.metrics.attention import CONTENT_PROBES
    from diffcircuit.protocol.roles import role_tests_table

    rng = np.random.default_rng(0)
    heads = pd.DataFrame(
        [
            {
                "dataset": "a",
                "timestep": 500,
                "image": i,
                "layer": "L",
                "head": h,
                **{
                    f"{p}_{k}": rng.normal(0.3 * (h == 1), 1)
                    for p in CONTENT_PROBES
                    for k in ("log", "excess")
                },
            }
            for i in range(20)
            for h in range(3)
        ]
    )
    shards = [
        pd.DataFrame(
            [
                {
                    "timestep": 500,
                    "layer": "L",
                    "head": h,
                    "probe": p,
                    "observed": 0.0,
                    "scale": 1.0 + s,
                    "n_images": 10,
                    "n_permutations": 99,
                    "excess": rng.normal(-0.5, 1, 99).astype(np.float32),
                }
                for h in range(3)
                for p in CONTENT_PROBES
            ]
        )
        for s in range(2)
    ]
    tests = role_tests_table(heads, {"a": pd.concat(shards, ignore_index=True)}).set_index(
        ["head", "probe"]
    )
    for h in range(3):
        for p in CONTENT_PROBES:
            total = sum(
                s.set_index(["head", "probe"]).excess[(h, p)].astype(np.float64) for s in shards
            )
            expected = (1 + (total >= -1e-9 * 3.0).sum()) / 100  # scale: 1 + 2 over the two shards
            row = tests.loc[(h, p)]
            assert (
                row.p_value == pytest.approx(expected)
                and row.n_null_images == 20
                and row.n_permutations == 99
            )
            excess = heads[heads["head"] == h].sort_values("image")[f"{p}_excess"].to_numpy()
            ref = stats.bootstrap(
                (excess,),
                np.mean,
                n_resamples=2000,
                method="percentile",
                random_state=np.random.default_rng(0),
            )
            assert (row.ci_low, row.ci_high) == pytest.approx(
                tuple(ref.confidence_interval), rel=1e-12
            )
            assert row.excess == pytest.approx(excess.mean()) and row.effect_size == pytest.approx(
                excess.mean() / excess.std(ddof=1)
            )
    for p in CONTENT_PROBES:
        np.testing.assert_allclose(
            tests.xs(p, level="probe").q_value,
            multipletests(tests.xs(p, level="probe").p_value, method="fdr_bh")[1],
        )


def test_blocks_tile_the_images_and_shards_hold_whole_blocks():
    assert null_blocks(100, 100) == [(0, 100)]
    assert null_blocks(240, 100) == [
        (0, 100),
        (100, 240),
    ]  # a remainder under half a block joins the last
    assert null_blocks(260, 100) == [(0, 100), (100, 200), (200, 260)]
    assert null_blocks(1, 100) == [(0, 1)]
    for n, step, block in [(100, 256, 100), (1000, 256, 100), (1000, 50, 100), (7, 3, 2)]:
        slices = shard_slices(n, step, block)
        assert slices[0][0] == 0 and slices[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(slices, slices[1:]))
        edges = {lo for lo, _ in null_blocks(n, block)}
        assert all(lo in edges for lo, _ in slices)
