from __future__ import annotations

import pytest

from diffcircuit import DiffcircuitError, RunConfig
from diffcircuit.protocol.config import parse_timesteps


def test_parse_timesteps():
    assert parse_timesteps("100,500, 900") == (100, 500, 900)
    for bad in ("", "a,b", "1.5"):
        with pytest.raises(DiffcircuitError):
            parse_timesteps(bad)


@pytest.mark.parametrize("kwargs", [dict(n=0), dict(batch_size=0), dict(timesteps=(1, 1)), dict(seed=-1)])
def test_invalid_configs_are_refused(kwargs):
    with pytest.raises(DiffcircuitError):
        RunConfig(**kwargs)


def test_timesteps_checked_against_the_schedule():
    RunConfig(timesteps=(0, 999)).check_timesteps(1000)
    with pytest.raises(DiffcircuitError, match="1000"):
        RunConfig(timesteps=(1000,)).check_timesteps(1000)


def test_results_key_ignores_batch_size_and_device():
    assert RunConfig(batch_size=3).results_key() == RunConfig(batch_size=7, device="cuda").results_key()
    assert RunConfig(seed=1).results_key() != RunConfig(seed=2).results_key()
