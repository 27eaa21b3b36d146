"""``diffcircuit guidance``'s workflow (``run_guidance``): two whole runs, the prompt's and the empty prompt's, on the
same images and noise, compared head by head."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

import diffcircuit.protocol.runner as runner
from diffcircuit import DiffcircuitError, RunConfig
from diffcircuit.commands.guidance import run_guidance


def _heads(shift: float) -> pd.DataFrame:
    """Head metrics of 6 images at one timestep, two heads; the conditional branch is shifted by ``shift``
    for head 1 only."""
    rng = np.random.default_rng(0)
    base = rng.uniform(0.5, 0.9, size=(6, 2))
    rows = [
        {
            "dataset": "a",
            "timestep": 500,
            "layer": "mid",
            "head": h,
            "image": i,
            "entropy_norm": base[i, h] + (shift if h == 1 else 0.0),
        }
        for i in range(6)
        for h in range(2)
    ]
    return pd.DataFrame(rows)


def test_the_branches_differ_only_in_the_prompt_and_are_compared_paired(tmp_path, monkeypatch):
    seen = {}

    def fake_run(cfg, out, *, progress=None, finish=None):  # a whole run: its head metrics
        seen[out.name] = cfg
        (out / "tables").mkdir(parents=True)
        _heads(0.05 if cfg.prompt else 0.0).to_parquet(out / "tables" / "head_metrics.parquet")

    monkeypatch.setattr(runner, "run_protocol", fake_run)
    cfg = RunConfig(prompt="a face", n=6, ablate_n=0, seed=3)
    result = run_guidance(cfg, tmp_path / "g")
    cond, uncond = seen["conditional"], seen["unconditional"]
    assert cond == cfg  # the prompt's branch is the config as given
    assert uncond.prompt is None and uncond.captions is False and uncond.prompt_embeds is None
    assert (uncond.n, uncond.seed, uncond.timesteps) == (
        cfg.n,
        cfg.seed,
        cfg.timesteps,
    )  # same images, noise
    table = result.table.set_index("head")
    assert table.loc[1, "conditional"] - table.loc[1, "unconditional"] == pytest.approx(0.05)
    assert table.loc[0, "conditional"] == pytest.approx(table.loc[0, "unconditional"])
    # a constant paired shift of 0.05 on all 6 images: every sign flip but the identity lowers the mean,
    # so the exact two-sided sign-flip p is 2 / 2^6 (a Wilcoxon signed-rank test agrees it is the extreme)
    assert table.loc[1, "p_value"] == pytest.approx(2 / 2**6, abs=0.01)
    assert stats.wilcoxon(np.full(6, 0.05)).pvalue == pytest.approx(2 / 2**6)
    assert pd.read_parquet(tmp_path / "g" / "guidance.parquet").equals(result.table)


def test_guidance_refuses_an_empty_prompt_and_an_existing_directory(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "run_protocol", lambda *a, **k: pytest.fail("nothing may run"))
    with pytest.raises(DiffcircuitError, match="prompt must not be empty"):
        run_guidance(RunConfig(n=6, ablate_n=0), tmp_path / "g")
    (tmp_path / "g").mkdir()
    with pytest.raises(DiffcircuitError, match="exists"):
        run_guidance(RunConfig(prompt="a face", n=6, ablate_n=0), tmp_path / "g")
