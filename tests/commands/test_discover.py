"""``diffcircuit discover``'s workflow: it claims its output directory like ``run`` (another config is refused
and leaves the directory as it was; the same config, finished, is read back)."""

from __future__ import annotations

import dataclasses

import pytest

from diffcircuit import DiffcircuitError
from diffcircuit.commands.discover import DiscoverConfig, run_discovery


def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_discover_refuses_another_config_in_its_directory(small_model_dir, tmp_path):
    cfg = DiscoverConfig(
        model=str(small_model_dir),
        data_b=None,
        n=2,
        timesteps=(500,),
        resamples=0,
        mean_reference="insample",
    )
    out = tmp_path / "disc"
    run_discovery(cfg, out)
    before = _files(out)
    assert any(p.parts[0] == "circuits" for p in before)
    with pytest.raises(DiffcircuitError, match="different config"):
        run_discovery(dataclasses.replace(cfg, seed=1), out)
    assert _files(out) == before  # nothing of the refused run is written, nothing old removed
    assert set(_files(out)) == set(before)


def test_discover_resumes_a_finished_directory_without_computing(
    small_model_dir, tmp_path, monkeypatch
):
    import diffcircuit.commands.discover as command

    cfg = DiscoverConfig(
        model=str(small_model_dir),
        n=2,
        timesteps=(500, 900),
        resamples=0,
        mean_reference="insample",
    )
    out = tmp_path / "disc"
    first = run_discovery(cfg, out)
    before = _files(out)

    def refuse(*args, **kwargs):
        raise AssertionError("a finished discovery was computed again")

    monkeypatch.setattr(command, "discover_circuits", refuse)
    for again in (cfg, dataclasses.replace(cfg, batch_size=1)):  # the batch size changes no result
        second = run_discovery(again, out)
        assert second.circuits == first.circuits and second.labels == first.labels
        assert second.table.equals(first.table) and second.curves.equals(first.curves)
        assert _files(out) == before  # read back, nothing rewritten
