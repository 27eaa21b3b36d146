"""What the command line prints (cli_render.py's rendering); its options are in test_cli_options.py and the
commands end to end in integration/test_cli.py."""

from __future__ import annotations


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
