"""``dc.run`` returns a typed ``RunResult``: the summary as a dataclass, tables read on demand."""

from __future__ import annotations

import json

import pandas as pd
import pytest

import diffcircuit as dc


@pytest.fixture(scope="module")
def result(small_model_dir_module, tmp_path_factory):
    out = tmp_path_factory.mktemp("typed") / "run"
    return dc.run(
        out,
        model=str(small_model_dir_module),
        n=3,
        timesteps=[20, 800],
        ablate_n=2,
        seed_repeats=0,
        analyses=["ablation", "discovery"],
        circuit_resamples=1,
        device="cpu",
    )


def test_run_takes_config_fields_and_returns_a_typed_result(result):
    assert isinstance(result, dc.RunResult) and isinstance(result.summary, dc.Summary)
    on_disk = json.loads((result.out_dir / "summary.json").read_text())
    assert result.summary.to_dict() == on_disk  # the dataclass is the JSON, typed
    assert result.summary.timesteps == [20, 800] and result.manifest["config"]["n"] == 3
    assert result.report.exists()
    assert json.loads(result.summary_path.read_text()) == on_disk
    assert json.loads(result.manifest_path.read_text()) == result.manifest
    assert set(result.figures) == {p.stem for p in (result.out_dir / "figures").glob("*.png")}
    assert "entropy_heatmap" in result.figures and result.figures["entropy_heatmap"].exists()
    claims = result.summary.claims
    assert claims and all(isinstance(c, dc.Claim) for c in claims)
    assert {c.claim for c in claims} == {c["claim"] for c in on_disk["validity"]["claims"]}
    assert all(c.status == "supported" and c.headline for c in result.summary.supported)


def test_tables_are_read_on_demand_and_unknown_ones_named(result):
    assert "ablations" in result.tables and "head_metrics" in result.tables
    pd.testing.assert_frame_equal(
        result.table("denoising"), pd.read_parquet(result.out_dir / "tables" / "denoising.parquet")
    )
    assert result.head_metrics is result.table("head_metrics")  # read once
    with pytest.raises(dc.DiffcircuitError, match="no table 'nope'.*ablations"):
        result.table("nope")
    again = dc.RunResult.read(result.out_dir)
    assert again.summary == result.summary
    records = result.circuits  # typed records, the JSON files' content
    on_disk = [
        json.loads(p.read_text()) for p in sorted((result.out_dir / "circuits").glob("*.json"))
    ]
    assert (
        all(isinstance(c, dc.CircuitRecord) for c in records)
        and [c.to_dict() for c in records] == on_disk
    )


def test_config_and_fields_combine_and_the_old_argument_order_still_works(
    small_model_dir_module, tmp_path
):
    cfg = dc.RunConfig(
        model=str(small_model_dir_module),
        n=3,
        timesteps=(20,),
        ablate_n=0,
        seed_repeats=0,
        device="cpu",
    )
    first = dc.run(tmp_path / "a", cfg)
    assert first.manifest["config"]["timesteps"] == [20]
    assert "Not run: ablate_n = 0" in first.report.read_text()  # the reason this run had
    again = dc.run(cfg, tmp_path / "a")  # run(config, out_dir), as before: the same config resumes
    assert again.summary == first.summary
    with pytest.raises(dc.DiffcircuitError, match="different config"):
        dc.run(tmp_path / "a", cfg, seed=1)  # a field on top of the config: another config


def test_fields_on_top_of_a_config_are_parsed_and_named_like_a_config_files(tmp_path):
    cfg = dc.RunConfig(n=3, ablate_n=0, timesteps=(20,))
    with pytest.raises(dc.DiffcircuitError, match="no_such_field"):
        dc.run(tmp_path / "a", cfg, no_such_field=1)  # a typo: named, not a TypeError
    with pytest.raises(dc.DiffcircuitError, match="timesteps.*outside"):
        dc.run(tmp_path / "b", cfg, timesteps="100,2000")  # parsed, then range-checked
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
