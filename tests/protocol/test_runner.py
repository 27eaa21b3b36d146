"""The run's progress: every stage's bar, and an overall one weighted by each stage's estimated work."""

from __future__ import annotations

import diffcircuit as dc
from diffcircuit.protocol.runner import OVERALL, run_protocol


def test_the_overall_bar_runs_from_0_to_its_total_across_every_stage(
    small_model_dir_module, tmp_path
):
    events = []
    cfg = dc.RunConfig(
        model=str(small_model_dir_module),
        n=3,
        timesteps=(20, 800),
        ablate_n=2,
        seed_repeats=1,
        circuit_resamples=1,
        device="cpu",
    )
    run_protocol(
        cfg,
        tmp_path / "run",
        progress=lambda stage, done, total: events.append((stage, done, total)),
    )
    overall = [(done, total) for stage, done, total in events if stage == OVERALL]
    totals = {total for _, total in overall}
    assert (
        len(totals) == 1 and overall[-1][0] == overall[-1][1] > 0
    )  # one total, reached at the end
    assert [d for d, _ in overall] == sorted(d for d, _ in overall)  # never goes back
    stages = {stage for stage, _, _ in events} - {OVERALL}
    assert {"observe", "ablate", "patch", "attribute", "discover"} <= stages
    resumed = []
    run_protocol(
        cfg,
        tmp_path / "run",
        progress=lambda stage, done, total: resumed.append((stage, done, total)),
    )
    assert [(d, t) for s, d, t in resumed if s == OVERALL][-1] == overall[
        -1
    ]  # a resumed run counts its shards as done


def test_the_finish_step_runs_while_the_directory_is_still_the_runs(
    small_model_dir_module, tmp_path
):
    """dc.run writes summary.json and report.html (finish = finalize_run) before it lets the directory go: a
    second claim during the finish step is refused, and one after it succeeds."""
    import pytest

    from diffcircuit import DiffcircuitError
    from diffcircuit.protocol.store import claim_directory

    out = tmp_path / "run"
    cfg = dc.RunConfig(
        model=str(small_model_dir_module), n=2, timesteps=(500,), ablate_n=0, device="cpu"
    )

    def finish(run_dir):
        with pytest.raises(DiffcircuitError, match="in use"), claim_directory(run_dir):
            pass
        return "finished"

    assert run_protocol(cfg, out, finish=finish) == "finished"
    with claim_directory(out):  # released afterwards
        pass
