"""discover_circuits' records: claimed circuits, honest intervals, and circuit size at matched faithfulness."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from diffcircuit import CircuitRecord, load_denoiser, load_images, probe_registry
from diffcircuit.discovery.circuits import CircuitLoss
from diffcircuit.interventions.ablation import Target, targets
from diffcircuit.interventions.sweep import ablation_sweep
from diffcircuit.protocol.circuits import (
    MIN_CI_RESAMPLES,
    PRIMARY_TAU,
    _size_ratio,
    bootstrap_interval,
    circuit_complexity,
    discover_circuits,
    importance_rows,
)

T = 300


def test_few_resamples_give_their_range_never_a_95_percent_interval():
    span, ci, note = bootstrap_interval([6, 9], 13)
    assert (
        span == [6, 9]
        and ci is None
        and "not a 95 % interval" in note
        and "2 bootstrap replicates" in note
    )
    assert bootstrap_interval([], 3) == (None, None, "no bootstrap replicates")
    values = np.random.default_rng(0).normal(10, 1, MIN_CI_RESAMPLES)
    span, ci, note = bootstrap_interval(values, 10.0)
    assert ci == pytest.approx(list(np.percentile(values, [2.5, 97.5]))) and span == [
        values.min(),
        values.max(),
    ]
    assert note.startswith("95 % percentile interval")
    span, ci, note = bootstrap_interval(
        values, 20.0
    )  # an interval that excludes its own estimate is no CI
    assert ci is None and "excludes the estimate" in note


@pytest.fixture(scope="module")
def found():
    den = load_denoiser()
    images = {
        "a": load_images("synthetic", n=5, size=32, channels=3).images,
        "b": load_images("faces", n=5, size=32, channels=3).images,
    }
    registry = probe_registry(
        den, torch.from_numpy(images["a"][:1]), torch.zeros(1, dtype=torch.long)
    )
    importance = pd.concat(
        [
            importance_rows(
                ablation_sweep(
                    den,
                    x,
                    targets=targets(registry, "head"),
                    methods=["mean"],
                    timesteps=[T],
                    dataset=k,
                    registry=registry,
                )
            )
            for k, x in images.items()
        ],
        ignore_index=True,
    )
    table, circuits, curves = discover_circuits(
        den, images, importance, registry=registry, windows=[(T,)], resamples=2, taus=(PRIMARY_TAU,)
    )
    return den, images, registry, table, circuits, curves


def test_a_claimed_circuit_records_its_gap_losses_and_necessary_heads(found):
    den, images, registry, table, circuits, _ = found
    for c in circuits:
        assert (
            c.claimed and c.claim.startswith(f"circuit: {c.size} heads") and "in-sample" in c.claim
        )
        assert c.gap["significant"] and c.gap["p_value"] < 0.05 and c.gap["n_images"] == 5
        assert c.gap["ci_low"] <= c.gap["mean"] <= c.gap["ci_high"]
        assert c.gap["mean"] == pytest.approx(c.loss_empty - c.loss_full)
        # the losses re-measured by the sweep: everything outside the circuit ablated
        outside = tuple(h for h in registry if str(h) not in c.heads)
        rows = ablation_sweep(
            den,
            images[c.dataset],
            targets=[Target(level="random", name="out", heads=outside)],
            methods=["mean"],
            timesteps=[T],
            dataset=c.dataset,
            registry=registry,
        )
        assert c.loss_circuit == pytest.approx(rows.mse_intervened.mean(), rel=1e-5)
        assert c.loss_circuit - c.loss_full <= PRIMARY_TAU * (c.loss_empty - c.loss_full) * (
            1 + 1e-9
        )
        assert c.faithfulness == pytest.approx(
            (c.loss_empty - c.loss_circuit) / (c.loss_empty - c.loss_full)
        )
        assert c.n_necessary == len(c.necessary) and set(c.necessary) <= set(c.heads)
        # out of sample: each resample's circuit scored on the images it left out (the maths: tests/discovery)
        oob = c.out_of_bag
        assert (
            oob["resamples"] == 2 and 1 <= oob["images_scored"] <= 5 and oob["images_left_out"] > 0
        )
        assert "out of sample" in c.claim
        primary = table[(table.dataset == c.dataset) & (table.tau == PRIMARY_TAU)]
        assert sorted(primary[primary.in_circuit]["head"]) == sorted(c.heads)


def test_necessity_is_what_ablating_one_more_head_does(found):
    den, images, registry, _, circuits, _ = found
    c = circuits[0]
    loss = CircuitLoss(den, images[c.dataset], timesteps=[T], dataset=c.dataset, registry=registry)
    outside = [h for h in registry if str(h) not in c.heads]
    budget = PRIMARY_TAU * (c.loss_empty - c.loss_full)
    by_hand = sorted(
        h for h in c.heads if loss([*outside, registry.parse(h)]) - c.loss_full > budget
    )
    assert c.necessary == by_hand


def test_sizes_and_overlap_from_two_resamples_are_ranges_labelled_as_such(found):
    for c in found[4]:
        assert c.resamples == 2 and c.size_ci is None
        assert (
            c.size_range == [min(c.boot_sizes), max(c.boot_sizes)]
            and "not a 95 %" in c.size_interval
        )
        o = c.overlap_with_other
        assert o["ci_low"] is None and o["ci_high"] is None and o["resamples"] == 2


def test_circuit_complexity_is_the_size_ratio_at_matched_faithfulness(found):
    _, _, _, _, circuits, curves = found
    a, b = (next(c for c in circuits if c.dataset == k) for k in "ab")
    k = a.complexity
    assert (k["size_a"], k["size_b"]) == (len(a.heads), len(b.heads))
    assert k["ratio_b_over_a"] == pytest.approx(len(b.heads) / len(a.heads))
    assert k["ratio_range"] == [
        min(y / x for x, y in zip(a.boot_sizes, b.boot_sizes)),
        max(y / x for x, y in zip(a.boot_sizes, b.boot_sizes)),
    ]
    for c in (a, b):  # the top-k size: the smallest traced size whose faithfulness reaches 1 − τ
        curve = curves[curves.dataset == c.dataset]
        assert c.topk_size == curve[curve.faithfulness >= 1 - PRIMARY_TAU]["size"].min()
    table = circuit_complexity(circuits)
    assert len(table) == 1 and table.ratio_b_over_a.iloc[0] == pytest.approx(k["ratio_b_over_a"])
    assert (
        np.isnan(table.ratio_ci_low.iloc[0])
        and table.ratio_range_low.iloc[0] == k["ratio_range"][0]
    )


def test_the_output_metric_measures_from_the_full_models_output(found):
    den, images, registry, *_ = found
    importance = importance_rows(
        ablation_sweep(
            den,
            images["b"],
            targets=targets(registry, "head"),
            methods=["mean"],
            timesteps=[T],
            dataset="b",
            registry=registry,
        )
    )
    _, (c,), _ = discover_circuits(
        den,
        {"b": images["b"]},
        importance,
        registry=registry,
        windows=[(T,)],
        resamples=0,
        metric="output",
        taus=(PRIMARY_TAU,),
    )
    assert c.metric == "output" and c.loss_full == 0 and c.gap["relative"] is None
    assert c.claimed and c.loss_circuit <= PRIMARY_TAU * c.loss_empty * (1 + 1e-9)


def test_the_circuit_metric_and_gap_shares_are_validated_config_fields():
    from diffcircuit import DiffcircuitError, RunConfig
    from diffcircuit.protocol.config import default_config_yaml

    assert (
        RunConfig().circuit_metric == "eps"
        and RunConfig(circuit_metric="output").results_key()["circuit_metric"] == "output"
    )
    assert "circuit_metric: eps" in default_config_yaml()
    with pytest.raises(DiffcircuitError, match="circuit_metric"):
        RunConfig(circuit_metric="kl")
    with pytest.raises(DiffcircuitError, match="fractions of the gap"):
        RunConfig(
            circuit_taus=(0.05, 2.0)
        )  # τ is a share of the gap: 1 or more would allow the empty circuit


def test_a_resample_with_an_empty_circuit_on_either_side_gives_no_ratio():
    def record(dataset, size, boot_sizes, topk_size):
        return CircuitRecord(
            dataset=dataset,
            window="500",
            timesteps=[500],
            method="mean",
            metric="eps",
            tau=PRIMARY_TAU,
            ranking="exhaustive mean ablation",
            claimed=True,
            gap={},
            loss_full=1.0,
            loss_empty=2.0,
            size=size,
            boot_sizes=boot_sizes,
            topk_size=topk_size,
            claim="circuit",
        )

    out = _size_ratio(record("a", 3, [3, 0, 2, 4], 3), record("b", 6, [0, 4, 4, 4], 5))
    assert (
        out["ratio_b_over_a"] == 2.0
        and out["resamples"] == 2
        and out["resamples_with_an_empty_circuit"] == 2
    )
    assert out["ratio_range"] == [
        1.0,
        2.0,
    ]  # 4/4 and 4/2: neither 0 (b empty) nor a division by a's 0
    assert "conditional on a non-empty circuit on both sides (2 of 4" in out["ratio_interval"]
