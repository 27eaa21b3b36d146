"""``diffcircuit ablate`` and ``discover``: mean ablation's reference is held out from the evaluated images."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from diffcircuit import DiffcircuitError, load_denoiser, model_images, probe_registry
from diffcircuit.commands.ablate import AblateConfig, run_ablations
from diffcircuit.interventions.ablation import targets
from diffcircuit.interventions.sweep import ReferenceImages, ablation_sweep
from diffcircuit.protocol.datasets import first_images, reference_split

N, T = 3, 400


def test_held_out_reference_is_the_next_n_images(small_model_dir, tmp_path):
    den = load_denoiser(small_model_dir)
    six = model_images(den, "synthetic", n=2 * N, seed=0)
    registry = probe_registry(
        den, torch.from_numpy(six.images[:1]), torch.zeros(1, dtype=torch.long)
    )
    block = [t for t in targets(registry, "block") if t.name == "mid_block"]
    # what the held-out reference means, spelt out: evaluate rows 0..N-1, take the mean over rows N..2N-1
    expected = ablation_sweep(
        den,
        np.asarray(six.images[:N]),
        targets=block,
        methods=["mean"],
        timesteps=[T],
        seed=0,
        dataset="synthetic",
        registry=registry,
        reference=[ReferenceImages("synthetic", np.asarray(six.images[N:]), np.arange(N, 2 * N))],
    )
    insample = ablation_sweep(
        den,
        np.asarray(six.images[:N]),
        targets=block,
        methods=["mean"],
        timesteps=[T],
        seed=0,
        dataset="synthetic",
        registry=registry,
    )
    cfg = dict(
        model=str(small_model_dir),
        data="synthetic",
        n=N,
        timesteps=(T,),
        methods=("mean",),
        names=("mid_block",),
    )
    held = run_ablations(AblateConfig(**cfg), tmp_path / "held")
    own = run_ablations(AblateConfig(**cfg, mean_reference="insample"), tmp_path / "own")
    cols = ["image", "mse_intervened", "degradation_pct"]
    pd.testing.assert_frame_equal(
        held[cols].reset_index(drop=True), expected[cols].reset_index(drop=True)
    )
    pd.testing.assert_frame_equal(
        own[cols].reset_index(drop=True), insample[cols].reset_index(drop=True)
    )
    assert not np.allclose(held.mse_intervened, own.mse_intervened)  # the reference matters
    assert sorted(held.image.unique()) == list(range(N))  # only the first N are evaluated


def test_reference_split_pools_and_refuses_too_few_images(small_model_dir):
    den = load_denoiser(small_model_dir)
    sets = {
        k: model_images(den, spec, n=4, seed=0) for k, spec in (("a", "synthetic"), ("b", "faces"))
    }
    evaluated, refs = reference_split(sets, 2, "pooled")
    assert all(len(s) == 2 and s.names == ("0", "1") for s in evaluated.values())
    assert [r.dataset for r in refs["a"]] == ["a", "b"] and list(refs["b"][1].index) == [2, 3]
    np.testing.assert_array_equal(refs["a"][1].images, np.asarray(sets["b"].images[2:4]))
    np.testing.assert_array_equal(first_images(sets["a"], 2).masks, np.asarray(sets["a"].masks[:2]))
    assert reference_split(sets, 2, "insample")[1] is None
    with pytest.raises(DiffcircuitError, match="has no more"):
        reference_split(sets, 4, "heldout")
    with pytest.raises(DiffcircuitError, match="must be one of"):
        reference_split(sets, 2, "median")


def test_sampling_with_each_target_ablated_reports_its_steps_out_of_a_known_total(
    small_model_dir, tmp_path
):
    cfg = AblateConfig(
        model=str(small_model_dir),
        data="synthetic",
        n=1,
        names=("mid_block.attentions.0",),
        sample=1,
        sample_steps=2,
    )
    steps = []
    run_ablations(
        cfg, tmp_path / "out", sampling_progress=lambda k, total: steps.append((k, total))
    )
    assert {total for _, total in steps} == {2 * 2}  # one target: clean and ablated, 2 steps each
    assert sum(k for k, _ in steps) == 4
    assert len(pd.read_parquet(tmp_path / "out" / "tables" / "sampling.parquet")) == 1


def test_ablate_resumes_a_finished_directory_and_refuses_another_config(
    small_model_dir, tmp_path, monkeypatch
):
    import dataclasses

    import diffcircuit.commands.ablate as command

    cfg = AblateConfig(
        model=str(small_model_dir), data="synthetic", n=2, levels=("layer",), timesteps=(500,)
    )
    out = tmp_path / "out"
    first = run_ablations(cfg, out)
    record = (out / "ablate.json").read_bytes()

    def refuse(*args, **kwargs):
        raise AssertionError("a finished ablation was computed again")

    monkeypatch.setattr(command, "ablation_sweep", refuse)
    for again in (cfg, dataclasses.replace(cfg, batch_size=1)):  # the batch size changes no result
        pd.testing.assert_frame_equal(run_ablations(again, out), first)
    assert (out / "ablate.json").read_bytes() == record
    with pytest.raises(DiffcircuitError, match="different config"):
        run_ablations(dataclasses.replace(cfg, seed=1), out)
