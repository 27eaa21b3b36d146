from __future__ import annotations

import pytest

from diffcircuit import DiffcircuitError, RunConfig
from diffcircuit.protocol.config import parse_timesteps


def test_parse_timesteps():
    assert parse_timesteps("100,500, 900") == (100, 500, 900)
    for bad in ("", "a,b", "1.5"):
        with pytest.raises(DiffcircuitError):
            parse_timesteps(bad)


@pytest.mark.parametrize(
    "kwargs", [dict(n=0), dict(batch_size=0), dict(timesteps=(1, 1)), dict(seed=-1)]
)
def test_invalid_configs_are_refused(kwargs):
    with pytest.raises(DiffcircuitError):
        RunConfig(**kwargs)


def test_results_key_ignores_batch_size_and_device():
    assert (
        RunConfig(batch_size=3).results_key()
        == RunConfig(batch_size=7, device="cuda").results_key()
    )
    assert RunConfig(seed=1).results_key() != RunConfig(seed=2).results_key()


def test_the_capture_path_changes_results_only_below_fp32():
    # fp32: fused = naive to 1e-5; bf16: the fused kernel runs in bf16, the naive reference in fp32
    assert RunConfig(capture="naive").results_key() == RunConfig().results_key()
    assert (
        RunConfig(capture="naive", precision="bf16").results_key()
        != RunConfig(precision="bf16").results_key()
    )


def test_the_paper_preset_round_trips_through_the_config_loader(tmp_path):
    from diffcircuit.protocol.config import PRESETS, default_config_yaml, load_config_file

    path = tmp_path / "paper.yaml"
    path.write_text(default_config_yaml("paper"))
    loaded = RunConfig.from_mapping(load_config_file(path), source=str(path))
    assert (
        loaded.n == 2000
        and len(loaded.timesteps) == 10
        and loaded.model == "google/ddpm-celebahq-256"
    )
    assert loaded == RunConfig(**PRESETS["paper"])
    with pytest.raises(DiffcircuitError, match="unknown preset"):
        default_config_yaml("huge")


def test_analyses_and_circuit_taus_are_validated_and_read_from_strings():
    cfg = RunConfig.from_mapping({"analyses": "ablation,discovery", "circuit_taus": "0.05, 0.2"})
    assert cfg.analyses == ("ablation", "discovery") and cfg.circuit_taus == (0.05, 0.2)
    assert cfg.runs("discovery") and not cfg.runs("patching")
    assert not RunConfig(ablate_n=0).runs("ablation")
    assert not RunConfig(ablation_methods=("zero",)).runs("discovery")  # circuits use mean ablation
    for bad, message in [
        ({"analyses": "ablation,tea"}, "unknown analyses"),
        ({"analyses": "discovery"}, "include 'ablation'"),
        ({"circuit_taus": "0.02,0.1"}, "including 0.05"),
        ({"circuit_taus": "a"}, "comma-separated numbers"),
    ]:
        with pytest.raises(DiffcircuitError, match=message):
            RunConfig.from_mapping(bad)


@pytest.mark.parametrize("text", ["100,", ",100", "1,,2", " "])
def test_timesteps_with_an_empty_part_are_refused_not_read_as_fewer(text):
    with pytest.raises(DiffcircuitError, match="comma-separated integers|at least one timestep"):
        parse_timesteps(text)
    with pytest.raises(DiffcircuitError, match="comma-separated integers|at least one timestep"):
        RunConfig.from_mapping({"timesteps": text})


def test_an_empty_timestep_list_is_refused_as_such():
    with pytest.raises(DiffcircuitError, match="at least one timestep"):
        RunConfig(timesteps=())


def test_a_single_yaml_value_is_a_list_of_one_and_none_means_no_analyses(tmp_path):
    from diffcircuit.protocol.config import load_config_file

    path = tmp_path / "c.yaml"
    path.write_text("timesteps: 500\ncircuit_taus: 0.05\nanalyses: none\n")
    cfg = RunConfig.from_mapping(load_config_file(path), source=str(path))
    assert cfg.timesteps == (500,) and cfg.circuit_taus == (0.05,) and cfg.analyses == ()
    assert RunConfig.from_mapping({"analyses": "none"}).analyses == ()
    with pytest.raises(DiffcircuitError, match="analyses"):
        RunConfig.from_mapping({"analyses": ""})


def test_a_yaml_syntax_error_names_its_line(tmp_path):
    from diffcircuit.protocol.config import load_config_file

    path = tmp_path / "c.yaml"
    path.write_text("n: 8\nseed: 1\ntimesteps: [100, 500\n")
    with pytest.raises(DiffcircuitError, match=r"not valid YAML \(line 4, column 1\)"):
        load_config_file(path)
