"""What the command line prints (cli_render.py's rendering, the advice after Ctrl-C); its options are in
test_cli_options.py and the commands end to end in integration/test_cli.py."""

from __future__ import annotations

import pytest


def test_the_headline_table_is_not_cut_in_a_narrow_terminal():
    from rich.console import Console

    from diffcircuit import Summary
    from diffcircuit.cli_render import headline_table

    row = {"mean": 0.123456}
    summary = Summary(
        entropy=[{"dataset": "a", "timestep": 500, "entropy_norm": row}],
        denoising=[
            {
                "dataset": "a",
                "timestep": 500,
                "eps_mse": row,
                "eps_mse_trivial": row,
                "x0_mse": row,
                "x0_mse_trivial": row,
            }
        ],
        datasets={"a": {"spec": "synthetic"}},
        model={},
        seed=0,
        timesteps=[500],
    )
    console = Console(width=60, record=True)
    console.print(headline_table(summary))
    text = console.export_text()
    assert "…" not in text and "0.1235" in text and "keys" in text


@pytest.mark.parametrize(
    "argv, advice",
    [
        (["run", "--out", "x"], "resumes from the shards it finished"),
        (["cache", "--out", "x"], "remove it (or choose another --out)"),
        (["guidance", "--out", "x", "--prompt", "a"], "remove it (or choose another --out)"),
        (["ablate", "--out", "x"], "start it over"),
        (["train-tiny", "--out", "x"], "start it over"),
    ],
)
def test_ctrl_c_says_what_running_the_command_again_does(argv, advice):
    from diffcircuit.cli import _after_stop

    assert advice in _after_stop(argv)
