"""``diffcircuit generate``'s workflow (``run_generate``)."""

from __future__ import annotations


def test_generate_reports_progress_over_a_known_number_of_steps(small_model_dir, tmp_path):
    from diffcircuit.commands.generate import GenerateConfig, run_generate

    steps = []
    cfg = GenerateConfig(
        model=str(small_model_dir), ablate=("mid_block.attentions.0",), n=1, steps=3
    )
    run_generate(cfg, tmp_path / "grid.png", progress=steps.append)
    assert sum(steps) == 2 * 3  # clean and intervened sampling, every DDIM step
