from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from diffcircuit.metrics.attention import HEAD_METRICS
from diffcircuit.protocol.analyses import derived_tables, seed_quantities


def _heads(n=30, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for dataset, shift in (("a", 0.0), ("b", 0.8)):
        for image in range(n):
            for t in (100, 900):
                for head in range(3):
                    row = {
                        "dataset": dataset,
                        "image": image,
                        "timestep": t,
                        "layer": "L",
                        "head": head,
                        "n_keys": 64,
                        "entropy_nats": rng.normal(3 + shift * (head == 0), 0.2),
                    }
                    row["entropy_norm"] = row["entropy_nats"] / np.log(64)
                    row |= {m: rng.normal(1, 0.1) for m in HEAD_METRICS}
                    if dataset == "b":
                        row["object_affinity"] = np.nan
                    rows.append(row)
    return pd.DataFrame(rows)


def test_head_summary_means_and_cis():
    heads = _heads()
    summary = derived_tables(heads)["head_summary"]
    assert len(summary) == 2 * 2 * 3 * (2 + len(HEAD_METRICS))
    row = summary.query(
        "dataset == 'a' and timestep == 100 and head == 1 and metric == 'entropy_nats'"
    ).iloc[0]
    expected = heads.query("dataset == 'a' and timestep == 100 and head == 1").entropy_nats.mean()
    assert (
        row["mean"] == pytest.approx(expected)
        and row.ci_low < expected < row.ci_high
        and row.n_images == 30
    )
    assert summary.query("dataset == 'b' and metric == 'object_affinity'")["mean"].isna().all()


def test_divergence_finds_the_head_that_differs():
    heads = _heads(n=40)
    tables = derived_tables(heads)
    per_head = tables["divergence_heads"].query("timestep == 100").set_index("head")
    assert per_head.differs.tolist() == [True, False, False] and per_head.q_value[0] < 0.01
    g = heads.query("timestep == 100 and head == 0")
    expected = g[g.dataset == "b"].entropy_nats.mean() - g[g.dataset == "a"].entropy_nats.mean()
    assert (
        per_head.diff_nats[0] == pytest.approx(expected) and per_head.ci_low_nats[0] > 0.6
    )  # planted: 0.8
    assert per_head.diff_norm[0] == pytest.approx(expected / np.log(64))
    div = tables["divergence"].set_index("timestep")
    assert list(div.index) == [100, 900] and div.n_heads_differ.tolist() == [
        1,
        1,
    ]  # head 0 differs at both
    assert div.entropy_diff_nats[100] == pytest.approx(per_head.diff_nats.mean())
    assert (
        div.p_value[100] < 0.01
        and div.wasserstein_p[100] < 0.01
        and div.wasserstein_excess_nats[100] > 0.1
    )
    assert div.wasserstein_nats[100] == pytest.approx(per_head.wasserstein_nats.mean())
    # the figure draws W1 against the critical value: it is above exactly when p < 0.05
    assert (
        (div.wasserstein_nats > div.wasserstein_null_critical_nats) == (div.wasserstein_p < 0.05)
    ).all()
    tests = tables["tests"]
    assert set(tests.family) >= {
        "entropy_difference t=100",
        "entropy_difference t=900",
        "divergence_wasserstein",
    }
    assert len(tests[tests.family == "entropy_difference t=100"]) == 3 and tests.can_reject.all()


def test_complexity_per_timestep_against_plain_means():
    heads = _heads(n=30)
    table = derived_tables(heads)["complexity"]
    rows = table[table.measure == "mean_entropy_norm"].set_index("scope")
    assert list(
        table[table.measure == "mean_entropy_norm"].timestep.astype("object").fillna(-1)
    ) == [100, 900, -1]
    for t in (100, 900):
        row = table.query("measure == 'mean_entropy_norm' and timestep == @t").iloc[0]
        g = heads[heads.timestep == t]
        assert row.value == pytest.approx(
            g[g.dataset == "b"].entropy_norm.mean() / g[g.dataset == "a"].entropy_norm.mean()
        )
        assert row.ci_low < row.value < row.ci_high and row.can_reject and row.mde_ratio > 1
    assert rows.loc["pooled_over_timesteps", "value"] == pytest.approx(
        heads[heads.dataset == "b"].entropy_norm.mean()
        / heads[heads.dataset == "a"].entropy_norm.mean()
    )
    assert not table.primary.any()  # no ablations: no primary measure here


def test_no_derived_interval_excludes_its_estimate():
    from diffcircuit.stats.bootstrap import contains_estimate

    tables = derived_tables(_heads(n=12, seed=3))
    checks = [
        ("divergence", "entropy_diff_nats", "ci_low_nats", "ci_high_nats"),
        ("divergence", "entropy_diff_norm", "ci_low_norm", "ci_high_norm"),
        ("divergence_heads", "diff_nats", "ci_low_nats", "ci_high_nats"),
        ("divergence_heads", "diff_norm", "ci_low_norm", "ci_high_norm"),
        ("complexity", "value", "ci_low", "ci_high"),
        ("head_summary", "mean", "ci_low", "ci_high"),
    ]
    for name, est, low, high in checks:
        t = tables[name].dropna(subset=[low])
        assert len(t) and contains_estimate(t[est], t[low], t[high]).all(), name


def test_holm_correction_on_request():
    from statsmodels.stats.multitest import multipletests

    heads = _heads(n=20)
    bh = derived_tables(heads)["tests"]
    holm = derived_tables(heads, correction="holm")["tests"]
    for _, g in holm.groupby("family"):
        np.testing.assert_allclose(g.p_corrected, multipletests(g.p_value, method="holm")[1])
    assert (holm.p_corrected >= bh.p_corrected - 1e-12).all()  # Holm is the more conservative
    # the per-head "differs" labels and the W1 q of each head follow the same correction
    per_head = derived_tables(heads, correction="holm")["divergence_heads"]
    for _, g in per_head.groupby("timestep"):
        for p, q in (("p_value", "q_value"), ("wasserstein_p", "wasserstein_q")):
            np.testing.assert_allclose(g[q], multipletests(g[p], method="holm")[1])
        assert (g.differs == multipletests(g.p_value, method="holm")[0]).all()


def test_pivot_means_equals_pandas_pivot_table():
    from diffcircuit.protocol.roles import pivot_means

    rng = np.random.default_rng(4)
    frame = pd.DataFrame(
        {
            "dataset": rng.choice(["b", "a"], 300),
            "image": rng.integers(0, 9, 300),
            "layer": rng.choice(["up.1", "down.0", "mid"], 300),
            "head": rng.integers(0, 3, 300),
            "x": rng.normal(size=300),
            "w": rng.normal(size=300),
        }
    )  # repeated cells: averaged
    frame.loc[::7, "x"] = np.nan
    ref = frame.pivot_table(
        index=["dataset", "image"], columns=["layer", "head"], values=["x", "w"]
    )
    wide, rows, cols = pivot_means(frame, ["dataset", "image"], ["layer", "head"], ["x", "w"])
    np.testing.assert_allclose(wide, ref.to_numpy(), rtol=1e-12, equal_nan=True)
    assert list(zip(rows.dataset, rows.image)) == list(ref.index)
    assert [("w", *c) for c in zip(cols.layer, cols["head"])] == list(ref.columns)[: len(cols)]
    _, _, first = pivot_means(frame, ["image"], ["layer", "head"], ["w"], sort=False)
    assert list(zip(first.layer, first["head"])) == list(
        frame[["layer", "head"]].drop_duplicates().itertuples(index=False, name=None)
    )


def test_summary_intervals_and_ablation_tests_equal_scipy_on_the_same_seed():
    """The head summary's interval is scipy's percentile bootstrap of that head's images (seed 0, 1,000 resamples);
    every ablation's paired test is scipy's sign-flip test on its images (2,000 permutations, seed 0)."""
    from scipy import stats

    heads = _heads(n=25, seed=5)
    rng = np.random.default_rng(6)
    ablations = pd.DataFrame(
        [
            {
                "dataset": d,
                "timestep": 500,
                "image": i,
                "level": "head",
                "target": f"L:{h}",
                "n_heads": 1,
                "method": "zero",
                "mse_clean": c,
                "mse_intervened": c * rng.uniform(0.9, 1.3),
                "degradation_pct": 0.0,
            }
            for d in "ab"
            for h in range(3)
            for i in range(12)
            for c in [rng.uniform(0.5, 1)]
        ]
    )
    tables = derived_tables(heads, ablations)
    row = tables["head_summary"].query(
        "dataset == 'b' and timestep == 900 and head == 2 and metric == 'entropy_norm'"
    )
    values = (
        heads.query("dataset == 'b' and timestep == 900 and head == 2")
        .sort_values("image")
        .entropy_norm
    )
    ref = stats.bootstrap(
        (values.to_numpy(),),
        np.mean,
        n_resamples=1000,
        method="percentile",
        random_state=np.random.default_rng(0),
    )
    assert (row.ci_low.iloc[0], row.ci_high.iloc[0]) == pytest.approx(
        tuple(ref.confidence_interval), rel=1e-12
    )
    paired = tables["tests"].query("family == 'ablation_paired'")
    assert len(paired) == 6
    for r in paired.itertuples():
        g = ablations[ablations.target == r.what.split()[4].rstrip(",")]
        g = g[g.dataset == r.what.split("dataset ")[1][0]].sort_values("image")
        ref = stats.permutation_test(
            (g.mse_intervened.to_numpy(), g.mse_clean.to_numpy()),
            lambda x, y, axis: x.mean(axis) - y.mean(axis),
            permutation_type="samples",
            vectorized=True,
            n_resamples=2000,
            random_state=np.random.default_rng(0),
        )
        assert r.p_value == pytest.approx(ref.pvalue, rel=1e-12) and r.statistic == pytest.approx(
            ref.statistic
        )


def test_seed_quantities_give_the_wasserstein_excess_over_its_permutation_null():
    import itertools

    from scipy.stats import wasserstein_distance

    rng = np.random.default_rng(2)
    rows = [
        {"dataset": d, "image": i, "timestep": 500, "layer": "L", "head": h, "entropy_nats": v,
         "entropy_norm": v / 4}
        for d, shift in (("a", 0.0), ("b", 0.5))
        for i in range(4)
        for h, v in enumerate(rng.normal(2 + shift, 0.3, 2))
    ]  # fmt: skip
    found = seed_quantities(pd.DataFrame(rows), seed=3).set_index("quantity").value
    x = pd.DataFrame(rows).pivot_table(
        index=["dataset", "image"], columns="head", values="entropy_nats"
    )
    a, b = x.loc["a"].to_numpy(), x.loc["b"].to_numpy()

    def w1(p, q):  # mean over heads of scipy's W1
        return np.mean([wasserstein_distance(p[:, h], q[:, h]) for h in range(p.shape[1])])

    pooled = np.concatenate([a, b])
    null = [  # every split of the 8 images into 4 + 4 (70 of them): the exact permutation null
        w1(pooled[list(s)], pooled[[i for i in range(8) if i not in s]])
        for s in itertools.combinations(range(8), 4)
    ]
    assert found["wasserstein_nats"] == pytest.approx(w1(a, b))
    assert found["wasserstein_excess_nats"] == pytest.approx(w1(a, b) - np.mean(null))
