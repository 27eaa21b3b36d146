"""Critical components against the random-set distribution, informative timesteps, and the ablation plan,
checked on planted tables against direct computations (scipy, statsmodels, plain numpy)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from statsmodels.stats.multitest import multipletests

from diffcircuit.protocol.analyses import denoising_tests, informative_timesteps
from diffcircuit.protocol.analyses import tests_table as build_tests_table
from diffcircuit.protocol.critical import critical_table

N_IMAGES, N_HEADS, R = 6, 10, 50  # R >= 20·(2 layers): a lone layer at the floor reaches q < 0.05


def _ablations(layer_effect: dict[int, float], seed: int = 0, random_sets: int = R) -> pd.DataFrame:
    """Two datasets x timesteps 500/900 x images; 10 heads (head 3 strong), layers L0 (4 heads) and L1, random 4-sets.

    ``layer_effect[t]``: layer L0's mean degradation at timestep t (the random sets: 2-3.2 %, three at ~5 %)."""
    rng = np.random.default_rng(seed)
    rows = []

    def add(d, t, i, level, target, k, v, also=""):
        rows.append(
            dict(
                dataset=d,
                timestep=t,
                image=i,
                level=level,
                target=target,
                n_heads=k,
                method="zero",
                degradation_pct=v,
                also_named=also,
            )
        )

    for d in "ab":
        for t in (500, 900):
            for i in range(N_IMAGES):
                for h in range(N_HEADS):
                    add(d, t, i, "head", f"L:{h}", 1, rng.normal(8.0 if h == 3 else 0.0, 0.5))
                add(d, t, i, "layer", "L0", 4, rng.normal(layer_effect[t], 0.5), also="B0")
                add(d, t, i, "layer", "L1", 4, rng.normal(2.0, 0.5))
                for r in range(random_sets):
                    spread = 3.0 if r < 3 else 0.3 * (r % 5)  # three random sets hit hard (~5 %)
                    add(d, t, i, "random", f"random4.{r}", 4, rng.normal(2.0, 1.0) + spread)
    return pd.DataFrame(rows)


def _per_image(frame: pd.DataFrame, target: str, pairs=None) -> pd.Series:
    rows = frame[frame.target == target]
    if pairs is not None:
        rows = rows[[(d, t) in pairs for d, t in zip(rows.dataset, rows.timestep)]]
    return rows.groupby(["dataset", "image"]).degradation_pct.mean()


def test_a_layer_beating_every_random_set_is_critical_with_the_rank_p_floor():
    ab = _ablations({500: 20.0, 900: 20.0})
    crit = critical_table(ab, seed=0).set_index(["level", "target"])
    row = crit.loc[("layer", "L0")]
    comp = _per_image(ab, "L0")
    sets = np.column_stack([_per_image(ab, f"random4.{r}") for r in range(R)])  # [images, sets]
    assert row.frac_sets_beaten == 1.0 and row.p_sets == pytest.approx(1 / (R + 1))
    ref = stats.permutation_test(
        (comp.to_numpy() - sets.mean(1),),
        np.mean,
        permutation_type="samples",
        alternative="greater",
        n_resamples=2000,
        random_state=0,
    )
    assert row.p_images == pytest.approx(ref.pvalue, abs=0.01)
    assert row.p_value == pytest.approx(
        max(1 / (R + 1), row.p_images)
    ) and row.p_floor == pytest.approx(1 / (R + 1))
    assert row.n_null_sets == R and row.also_named == "B0" and row.critical
    assert row.excess_pct == pytest.approx((comp.to_numpy() - sets.mean(1)).mean())
    assert row.null_q95_pct == pytest.approx(np.quantile(sets.mean(0), 0.95))
    layers = crit.xs("layer")
    np.testing.assert_allclose(
        layers.p_corrected, multipletests(layers.p_value, method="fdr_bh")[1]
    )
    assert layers.q_floor.iloc[0] == pytest.approx(
        min(1.0, 2 / (R + 1))
    )  # m = 2 layers, one at the floor
    assert not crit.loc[("layer", "L1")].critical  # a layer like the random sets


def test_a_layer_above_the_mean_but_below_some_sets_is_not_critical():
    ab = _ablations(
        {500: 4.0, 900: 4.0}
    )  # above the sets' mean (~2.8 %), below the three most harmful sets
    row = critical_table(ab, seed=0).set_index("target").loc["L0"]
    sets = np.column_stack([_per_image(ab, f"random4.{r}") for r in range(R)])
    comp = _per_image(ab, "L0").to_numpy()
    beaten = comp.mean() > sets.mean(0)
    assert row.frac_sets_beaten == pytest.approx(beaten.mean()) and row.frac_sets_beaten < 1
    assert row.p_sets == pytest.approx((1 + (~beaten).sum()) / (R + 1))
    assert (
        stats.ttest_1samp(comp - sets.mean(1), 0, alternative="greater").pvalue < 0.01
    )  # beats their mean
    assert not row.critical


def test_single_heads_are_ranked_among_the_other_heads_and_never_called_critical():
    ab = _ablations({500: 2.0, 900: 2.0})
    crit = critical_table(ab, seed=0)
    heads = crit[crit.level == "head"].set_index("target")
    means = {h: _per_image(ab, f"L:{h}").mean() for h in range(N_HEADS)}
    for h in range(N_HEADS):
        others = np.array([m for k, m in means.items() if k != h])
        assert heads.loc[f"L:{h}"].p_sets == pytest.approx(
            (1 + (others >= means[h]).sum()) / N_HEADS
        )
        assert heads.loc[f"L:{h}"].frac_sets_beaten == pytest.approx((means[h] > others).mean())
    assert heads.loc["L:3"].frac_sets_beaten == 1.0 and heads.n_null_sets.eq(N_HEADS - 1).all()
    assert (
        (heads.p_corrected >= 1 - 1e-12).all()
        and not heads.critical.any()
        and heads.q_floor.iloc[0] == 1.0
    )


def test_uninformative_timesteps_do_not_make_a_component_critical():
    ab = _ablations({500: 2.0, 900: 40.0})  # L0 is harmful only at t = 900
    assert critical_table(ab, seed=0).set_index("target").loc["L0"].critical
    keep = frozenset({("a", 500), ("b", 500)})
    row = critical_table(ab, seed=0, informative=keep).set_index("target").loc["L0"]
    assert not row.critical and row.timesteps == "a@500,b@500"
    assert row.degradation_pct == pytest.approx(_per_image(ab, "L0", keep).mean())
    none = critical_table(
        ab, seed=0, informative=frozenset()
    )  # no informative timestep: nothing is tested
    assert none.empty and "critical" in none


def test_components_tested_together_equal_each_tested_alone():
    """critical_table tests every component on shared draws; each row equals ``random_set_test`` of that component
    against its null members alone (the same draws for the same seed)."""
    from diffcircuit.stats.tests import random_set_test

    ab = _ablations({500: 20.0, 900: 3.0})
    crit = critical_table(ab, seed=1, n_resamples=500).set_index(["level", "target"])
    heads = np.column_stack([_per_image(ab, f"L:{h}") for h in range(N_HEADS)])
    alone = random_set_test(heads[:, 3], np.delete(heads, 3, axis=1), n_resamples=500, seed=1)
    row = crit.loc[("head", "L:3")]
    assert (row.p_images, row.ci_low, row.ci_high, row.frac_sets_beaten_ci_low) == pytest.approx(
        (alone.p_units, alone.ci_low, alone.ci_high, alone.frac_beaten_ci_low), rel=1e-12
    )
    sets = np.column_stack([_per_image(ab, f"random4.{r}") for r in range(R)])
    alone = random_set_test(_per_image(ab, "L1").to_numpy(), sets, n_resamples=500, seed=1)
    assert crit.loc[("layer", "L1")].p_value == pytest.approx(alone.p_value, rel=1e-12)


def test_a_significantly_harmless_component_is_not_counted_significant():
    """One-sided: a layer far *less* harmful than the random sets has p near 1, not a 'significant' result."""
    ab = _ablations({500: -10.0, 900: -10.0})
    crit = critical_table(ab, seed=0)
    row = crit.set_index("target").loc["L0"]
    assert row.p_value > 0.9 and not row.critical
    heads = pd.DataFrame(
        {
            "dataset": ["a", "b"] * 4,
            "image": [0, 0, 1, 1, 2, 2, 3, 3],
            "timestep": 500,
            "layer": "L",
            "head": 0,
            "entropy_nats": np.arange(8.0),
            "entropy_norm": np.arange(8.0) / 8,
        }
    )
    empty = pd.DataFrame(
        columns=[
            "timestep",
            "value",
            "p_value",
            "n_permutations",
            "bias_corrected",
            "measure",
            "n_a",
            "n_b",
        ]
    )
    tests = build_tests_table(heads, None, empty, empty, crit)
    family = tests[tests.family.str.startswith("critical_vs_random_sets ")]
    assert (family.alternative == "greater").all() and len(family) == len(crit)
    assert set(family.family) == {
        f"critical_vs_random_sets {lv}/{m}" for lv, m in zip(crit.level, crit.method)
    }
    for _, g in family.groupby(
        "family"
    ):  # each family's correction is the table's, and its size its own
        assert np.allclose(g.p_corrected, multipletests(g.p_value, method="fdr_bh")[1])
        assert (g.can_reject == ((len(g) * g.p_floor).clip(upper=1) < 0.05)).all()
    assert not (family.set_index("what").filter(like="layer L0", axis=0).p_corrected < 0.05).any()


def _denoising(seed=0, n=20):
    rng = np.random.default_rng(seed)
    rows = []
    for d in "ab":
        for t, ratio in (
            (500, 0.5),
            (900, 1.02),
        ):  # the model beats the trivial predictor at 500, not at 900
            trivial = rng.uniform(0.5, 1.5, n)
            model = trivial * ratio * rng.lognormal(0, 0.05, n)
            rows += [
                dict(dataset=d, timestep=t, image=i, eps_mse=m, eps_mse_trivial=v)
                for i, (m, v) in enumerate(zip(model, trivial))
            ]
    return pd.DataFrame(rows)


def test_denoising_tests_is_a_one_sided_paired_test_corrected_over_dataset_and_timestep():
    frame = _denoising()
    tests = denoising_tests(frame, seed=0).set_index(["dataset", "timestep"])
    for (d, t), g in frame.groupby(["dataset", "timestep"]):
        ref = stats.permutation_test(
            (g.eps_mse_trivial.to_numpy() - g.eps_mse.to_numpy(),),
            np.mean,
            permutation_type="samples",
            alternative="greater",
            n_resamples=2000,
            random_state=0,
        )
        assert tests.loc[(d, t)].p_value == pytest.approx(
            ref.pvalue, abs=0.03
        )  # two Monte-Carlo p-values
        assert tests.loc[(d, t)].frac_images_worse == pytest.approx(
            (g.eps_mse >= g.eps_mse_trivial).mean()
        )
        assert tests.loc[(d, t)].ratio_to_trivial == pytest.approx(
            g.eps_mse.mean() / g.eps_mse_trivial.mean()
        )
    np.testing.assert_allclose(tests.p_corrected, multipletests(tests.p_value, method="fdr_bh")[1])
    assert informative_timesteps(frame) == frozenset({("a", 500), ("b", 500)})
