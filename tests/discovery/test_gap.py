"""The gap L_empty − L_full per image, its test, the output metric and the claim where there is no gap.

References: the ablation sweep (per-image ε-MSE with heads ablated, computed by other code), an
exact enumeration of the sign flips, and a plain PyTorch forward of a copy whose heads are removed
by zeroing their output-projection weights.
"""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pandas as pd
import pytest
import torch
from statsmodels.stats.multitest import multipletests

from diffcircuit import Denoiser, load_images
from diffcircuit.discovery.circuits import CircuitLoss, gap_test
from diffcircuit.discovery.planted import zero_heads
from diffcircuit.interventions import Target, ablation_sweep
from diffcircuit.models.diffusion import add_noise
from diffcircuit.models.noise import batch_noise
from diffcircuit.protocol.circuits import NO_CIRCUIT, _gap_tests, discover_circuits


class _Fixed:
    """A loss whose per-image values are given: ``full`` with nothing ablated, ``empty`` with everything."""

    heads = ["l:0", "l:1"]

    def __init__(self, full, empty):
        self.full, self.empty = np.asarray(full, float), np.asarray(empty, float)

    def per_image(self, ablated):
        return self.empty if ablated else self.full


def test_gap_test_is_the_exact_one_sided_sign_flip_test():
    rng = np.random.default_rng(3)
    full = rng.uniform(1, 2, 10)
    empty = full + rng.normal(0.1, 0.2, 10)
    result = gap_test(_Fixed(full, empty))
    diff = empty - full
    flips = np.array(
        [np.mean(diff * s) for s in itertools.product([1, -1], repeat=10)]
    )  # all 1024 sign patterns
    assert result.p_value == pytest.approx(np.mean(flips >= diff.mean() - 1e-15))
    assert result.p_floor == 2.0**-10 and result.n_images == 10
    assert result.mean == pytest.approx(diff.mean()) and result.relative == pytest.approx(
        diff.mean() / full.mean()
    )
    assert result.ci_low <= result.mean <= result.ci_high
    assert result.effect_size == pytest.approx(diff.mean() / diff.std(ddof=1))
    assert (
        gap_test(_Fixed(full, full - 0.01)).p_value == 1.0
    )  # ablation helps on every image: nothing to claim


@pytest.mark.parametrize("gap, p", [(0.3, 0.5), (0.0, 1.0), (-0.2, 1.0)])
def test_one_image_gets_the_exact_two_flip_test_not_an_error(gap, p):
    """One image: its two sign flips give p = 1/2 when the gap is positive (never significant), 1 otherwise."""
    flips = np.array([gap, -gap])  # the enumeration, as for n images
    result = gap_test(_Fixed([1.0], [1.0 + gap]))
    assert result.p_value == np.mean(flips >= gap - 1e-15) == p
    assert result.p_floor == 0.5 and result.n_images == 1 and np.isnan(result.effect_size)
    assert np.isnan(result.ci_low) and np.isnan(result.ci_high)  # no interval from one image


def test_per_image_losses_and_the_gap_match_the_ablation_sweep(embedded):
    den, faces, registry = embedded
    loss = CircuitLoss(den, faces, timesteps=[300, 700], registry=registry)
    rows = ablation_sweep(
        den,
        faces,
        targets=[Target(level="random", name="all", heads=tuple(registry))],
        methods=["mean"],
        timesteps=[300, 700],
        registry=registry,
    )
    per_image = rows.groupby("image")[
        ["mse_clean", "mse_intervened"]
    ].mean()  # mean over the window's timesteps
    np.testing.assert_allclose(loss.per_image([]), per_image.mse_clean, rtol=1e-5)
    np.testing.assert_allclose(loss.per_image(loss.heads), per_image.mse_intervened, rtol=1e-5)
    assert gap_test(loss).mean == pytest.approx(
        (per_image.mse_intervened - per_image.mse_clean).mean(), rel=1e-4
    )


def test_output_metric_is_the_distance_to_the_full_models_output(embedded):
    den, faces, registry = embedded
    removed = [h for h in registry if h.layer == "mid_block.attentions.0"][:5]
    loss = CircuitLoss(
        den, faces, timesteps=[500], registry=registry, method="zero", metric="output"
    )
    assert np.all(loss.per_image([]) == 0)
    # reference: a plain forward of the model and of a copy whose removed heads have zero output weights
    zeroed = copy.deepcopy(den.network)
    zero_heads(zeroed, [str(h) for h in removed])
    x0 = torch.from_numpy(faces)
    eps = batch_noise(x0.shape[1:], seed=0, dataset="a", images=range(len(x0)), timestep=500)
    t = torch.full((len(x0),), 500)
    x_t = add_noise(x0, eps, t, den.alphas_cumprod)
    with torch.no_grad():
        full = den.eps_hat(den.network(x_t, t).sample, x_t, t)
        cut = den.eps_hat(zeroed(x_t, t).sample, x_t, t)
    expected = (cut - full).pow(2).flatten(1).mean(1).numpy()
    np.testing.assert_allclose(loss.per_image(removed), expected, rtol=1e-4, atol=1e-10)
    assert gap_test(loss).relative is None  # L_full = 0: no relative gap


def test_gap_tests_are_corrected_as_one_family():
    """Three windows' gaps: strong, p = 0.04 alone, and none. BH over the three withdraws the p = 0.04 claim."""
    full = np.ones(12)
    gaps = [
        np.full(12, 0.3) + np.random.default_rng(0).normal(0, 0.05, 12),
        np.random.default_rng(4).normal(0.12, 0.2, 12),
        np.random.default_rng(1).normal(0.0, 0.2, 12),
    ]
    losses = {("a", (t,)): _Fixed(full, full + g) for t, g in zip((1, 2, 3), gaps)}
    raw = {k: gap_test(v) for k, v in losses.items()}
    tests = _gap_tests(losses, seed=0, correction="fdr_bh")
    q = multipletests([t.p_value for t in raw.values()], method="fdr_bh")[1]
    for (key, t), qk in zip(raw.items(), q):
        assert tests[key].p_value == t.p_value and tests[key].p_corrected == pytest.approx(qk)
        assert tests[key].significant == (qk < 0.05) and tests[key].family_size == 3
        assert tests[key].q_floor == pytest.approx(3 * 2.0**-12)
    assert (
        raw[("a", (2,))].significant and not tests[("a", (2,))].significant
    )  # 0.04 alone, 0.06 corrected
    assert tests[("a", (1,))].significant


def _zero_importance(registry, datasets, timestep):
    return pd.DataFrame(
        [
            {
                "dataset": d,
                "timestep": timestep,
                "image": i,
                "target": str(h),
                "degradation_pct": 0.0,
            }
            for d in datasets
            for i in range(6)
            for h in registry
        ]
    )


def test_no_circuit_is_claimed_where_ablating_every_head_does_not_hurt(embedded):
    den, faces, registry = embedded
    dead = copy.deepcopy(den.network)
    zero_heads(
        dead, [str(h) for h in registry]
    )  # planted: no head can matter, the gap is exactly 0
    planted = Denoiser(
        network=dead, scheduler=den.scheduler, model_path=den.model_path, source="planted"
    )
    synthetic = load_images("synthetic", n=6, size=32, channels=3).images
    table, circuits, curves = discover_circuits(
        planted,
        {"a": synthetic, "b": faces},
        _zero_importance(registry, "ab", 500),
        registry=registry,
        windows=[(500,)],
        resamples=2,
    )
    assert len(circuits) == 2 and len(curves) == 0
    for c in circuits:
        assert not c.claimed and c.claim.startswith(NO_CIRCUIT)
        assert c.heads is None and c.faithfulness is None and c.recovered_without_circuit is None
        assert c.gap["mean"] == 0 and c.gap["p_value"] == 1.0
        assert c.overlap_with_other["jaccard"] is None and "skipped" in c.complexity
        assert c.loss_full == c.loss_empty
    assert not table.claimed.any() and not table.in_circuit.any()


def test_too_few_images_to_reach_significance_are_named_in_the_claim(embedded):
    den, faces, registry = embedded
    _, circuits, _ = discover_circuits(
        den,
        {"b": faces[:3]},
        _zero_importance(registry, "b", 300),
        registry=registry,
        windows=[(300,)],
        resamples=0,
        test_windows=[(300,), (900,)],
    )
    (c,) = circuits  # discovered at 300 only, corrected with 900's gap test too
    assert c.gap["mean"] > 0 and c.gap["p_floor"] == 1 / 8  # 3 images: 8 sign patterns
    assert (
        c.gap["family_size"] == 2 and c.gap["q_floor"] == 2 / 8 and c.gap["correction"] == "fdr_bh"
    )
    assert not c.claimed and "cannot go below 0.05" in c.claim and c.heads is None
