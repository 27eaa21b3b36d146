"""The summary's ablation, attribution and test counts, against direct computations on planted tables."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from diffcircuit import Summary
from diffcircuit.report.paper import paper_comparison
from diffcircuit.report.summary import _ablation, _attribution, _tests

N_IMAGES, N_HEADS = 12, 8


def _frames(seed=0):
    """Exhaustive single-head and all-heads ablations, and two estimators' scores, for one dataset x 2 timesteps."""
    rng = np.random.default_rng(seed)
    truth = np.linspace(0, 10, N_HEADS)
    abl, att = [], []
    for t in (500, 900):
        for i in range(N_IMAGES):
            clean = rng.uniform(0.5, 1.0)
            effects = truth + rng.normal(0, 2, N_HEADS)  # [heads] degradation % on this image
            for h in range(N_HEADS):
                common = dict(dataset="a", timestep=t, image=i, method="mean", mse_clean=clean)
                abl.append(
                    common
                    | dict(
                        level="head",
                        target=f"L:{h}",
                        degradation_pct=effects[h],
                        mse_intervened=clean * (1 + effects[h] / 100),
                        x0_mse_clean=1.0,
                        x0_mse_intervened=1.0,
                    )
                )
                guess = effects[h] + rng.normal(0, 3)
                att.append(
                    dict(
                        dataset="a",
                        timestep=t,
                        image=i,
                        layer="L",
                        head=h,
                        method="mean",
                        estimator="first_order",
                        degradation_pct=guess,
                        delta_mse=clean * guess / 100,
                    )
                )
                share = rng.uniform(0, 2)  # joint scores: shares of the all-heads effect
                att.append(
                    dict(
                        dataset="a",
                        timestep=t,
                        image=i,
                        layer="L",
                        head=h,
                        method="mean",
                        estimator="ig_joint",
                        degradation_pct=share,
                        delta_mse=clean * share / 100,
                    )
                )
            abl.append(
                dict(
                    dataset="a",
                    timestep=t,
                    image=i,
                    method="mean",
                    mse_clean=clean,
                    level="all",
                    target="all_heads",
                    degradation_pct=np.nan,
                    mse_intervened=clean,
                    x0_mse_clean=1.0,
                    x0_mse_intervened=1.0,
                )
            )  # set below: the joint scores' total plus noise
    abl, att = pd.DataFrame(abl), pd.DataFrame(att)
    totals = att[att.estimator == "ig_joint"].groupby(["timestep", "image"]).degradation_pct.sum()
    rows = abl.level == "all"
    noise = np.random.default_rng(seed + 1).normal(0, 1, rows.sum())
    abl.loc[rows, "degradation_pct"] = (
        totals.reindex(list(zip(abl[rows].timestep, abl[rows].image))).to_numpy() + noise
    )
    abl["n_heads"], abl["layer"], abl["head"] = 1, "L", 0
    return abl, att


def test_attribution_rho_and_its_bootstrap_ci_over_images():
    abl, att = _frames()
    rows = {
        (r["estimator"], r["timestep"]): r
        for r in _attribution(att, abl, seed=0, informative=frozenset({("a", 500)}))
    }
    first = rows[("first_order", 500)]
    truth = abl[(abl.level == "head") & (abl.timestep == 500)].pivot(
        index="image", columns="target", values="degradation_pct"
    )
    g = att[(att.estimator == "first_order") & (att.timestep == 500)]
    guess = g.assign(target="L:" + g["head"].astype(str)).pivot(
        index="image", columns="target", values="degradation_pct"
    )
    assert first["spearman"] == pytest.approx(stats.spearmanr(guess.mean(), truth.mean()).statistic)
    ref = stats.bootstrap(
        (np.arange(N_IMAGES),),
        lambda i: stats.spearmanr(guess.iloc[i].mean(), truth.iloc[i].mean()).statistic,
        vectorized=False,
        n_resamples=1000,
        method="percentile",
        random_state=3,
    ).confidence_interval
    assert first["ci_low"] == pytest.approx(ref.low, abs=0.08) and first[
        "ci_high"
    ] == pytest.approx(ref.high, abs=0.08)
    assert first["compared_with"] == "exhaustive single-head ablation" and first["informative"]
    assert not rows[("first_order", 900)]["informative"]
    joint = rows[("ig_joint", 500)]
    predicted = (
        att[(att.estimator == "ig_joint") & (att.timestep == 500)]
        .groupby("image")
        .degradation_pct.sum()
    )
    measured = abl[(abl.level == "all") & (abl.timestep == 500)].set_index("image").degradation_pct
    assert (
        joint["compared_with"] == "exhaustive all-heads ablation"
        and joint["spearman_over"] == "images"
    )
    assert joint["spearman"] == pytest.approx(
        stats.spearmanr(predicted, measured.reindex(predicted.index)).statistic
    )
    assert joint["predicted_pct"]["mean"] == pytest.approx(predicted.mean())
    assert joint["ci_low"] <= joint["spearman"] <= joint["ci_high"]
    assert "spearman" in joint["ranking_vs_single_head"]


def test_ablation_headline_leaves_uninformative_timesteps_out():
    abl, _ = _frames()
    abl.loc[(abl.timestep == 900) & (abl.target == "L:0"), "degradation_pct"] = (
        500.0  # huge, but uninformative
    )
    out = _ablation(abl, None, seed=0, informative=frozenset({("a", 500)}))
    kept = (
        abl[(abl.timestep == 500) & (abl.level == "head")].groupby("target").degradation_pct.mean()
    )
    assert out["degradation_range_pct"]["head"]["mean"] == pytest.approx([kept.min(), kept.max()])
    assert out["excluded"][0]["dataset"] == "a" and out["excluded"][0]["timestep"] == 900
    assert "L:0" not in [r["target"] for r in out["largest"] if r["level"] == "head"][:1]
    everything = _ablation(abl, None, seed=0)
    assert (
        everything["degradation_range_pct"]["head"]["mean"][1] > 100 and not everything["excluded"]
    )


def test_tests_count_only_the_direction_a_family_tests():
    tests = pd.DataFrame(
        {
            "family": ["critical"] * 4 + ["paired"] * 4,
            "alternative": ["greater"] * 4 + ["two-sided"] * 4,
            "statistic": [5.0, -5.0, 1.0, -1.0, 5.0, -5.0, -6.0, 0.1],
            # one-sided p: the harmless component (-5) has p near 1, not a 'significant' one
            "p_corrected": [0.01, 0.99, 0.2, 0.9, 0.01, 0.02, 0.03, 0.5],
        }
    )
    fam = _tests(tests)["families"]
    assert fam["critical"] == {"n_tests": 4, "alternative": "greater", "significant_bh_0.05": 1}
    assert fam["paired"]["significant_bh_0.05"] == 3
    assert fam["paired"]["significant_increase"] == 1 and fam["paired"]["significant_decrease"] == 2


def test_the_paper_comparison_does_not_pool_uninformative_timesteps():
    entry = {"value": 1.1, "p_value": 0.2}
    summary = Summary(
        model={},
        seed=0,
        datasets={},
        entropy=[],
        timesteps=[100, 900],
        roles=[],
        entropy_divergence=[],
        denoising=[
            {"dataset": d, "timestep": t, "informative": t == 100} for d in "ab" for t in (100, 900)
        ],
        complexity_ratio={
            "measure": "m",
            "stand_in_for": None,
            "paper_ratio": 1.084,
            "pooled": entry,
            "per_timestep": [entry | {"timestep": 100}, entry | {"timestep": 900}],
        },
    )
    out = paper_comparison(summary)["complexity_ratio"]
    assert out["pooled"] is None and "900" in out["pooled_withheld"]
    assert [r["timestep"] for r in out["per_timestep"]] == [100]
    for d in summary.denoising:
        d["informative"] = True
    assert paper_comparison(summary)["complexity_ratio"]["pooled"] == entry


def _patching_rows(rng, n_pairs: int, effects: dict[str, float], timesteps=(500,)) -> pd.DataFrame:
    """Moved fractions per pair x head x timestep: each head's planted effect plus noise sd 0.1."""
    heads = [f"L:{h}" for h in range(72)]
    rows = [
        {"level": "head", "target": h, "pair": p, "timestep": t, "moved_frac": effects.get(h, 0.0)}
        for t in timesteps
        for p in range(n_pairs)
        for h in heads
    ]
    frame = pd.DataFrame(rows)
    return frame.assign(moved_frac=frame.moved_frac + rng.normal(0, 0.1, len(frame)))


_MANIFEST = {"datasets": {"a": {"spec": "synthetic"}, "b": {"spec": "faces"}}}


def test_patching_chooses_its_top_components_on_other_pairs_than_it_measures_them_on():
    from diffcircuit.report.summary import _patching

    rng = np.random.default_rng(0)
    misses = same_pairs_misses = total = 0
    for k in range(20):  # no head moves anything: an honest 95 % CI misses 0 about 5 % of the time
        rows = _patching_rows(rng, 16, {})
        out = _patching(rows, _MANIFEST, seed=k)
        assert "chosen on 8 random pairs" in out["selection"]
        for r in out["largest"]:
            misses += not r["moved_frac"]["ci_low"] <= 0 <= r["moved_frac"]["ci_high"]
            # the same heads measured on every pair, including those they were chosen on: optimistic
            per_pair = rows[rows.target == r["target"]].groupby("pair").moved_frac.mean()
            low, high = stats.bootstrap(
                (per_pair.to_numpy(),), np.mean, random_state=k
            ).confidence_interval
            same_pairs_misses += not low <= 0 <= high
            total += 1
    assert misses / total <= 0.15 and same_pairs_misses / total >= 0.2
    # a real effect is still found, and measured near its planted size
    out = _patching(_patching_rows(rng, 16, {"L:7": 0.5}), _MANIFEST, seed=0)
    assert out["largest"][0]["target"] == "L:7"
    assert out["largest"][0]["moved_frac"]["mean"] == pytest.approx(0.5, abs=0.1)


def test_patching_with_few_pairs_says_its_values_are_post_selection_and_skips_uninformative_steps():
    from diffcircuit.report.summary import _patching

    rows = _patching_rows(np.random.default_rng(1), 6, {"L:3": 0.5}, timesteps=(500, 900))
    rows.loc[(rows.timestep == 900) & (rows.target == "L:5"), "moved_frac"] = 9.0  # uninformative
    out = _patching(rows, _MANIFEST, seed=0, informative=frozenset({("a", 500), ("b", 900)}))
    assert "post-selection" in out["selection"] and out["timesteps"] == [500]
    assert out["largest"][0]["target"] == "L:3" and "L:5" not in [
        r["target"] for r in out["largest"]
    ]
