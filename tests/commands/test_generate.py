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


def test_the_difference_row_says_its_scale_and_shows_the_largest_difference_white():
    import matplotlib.pyplot as plt
    import torch

    from diffcircuit.commands.generate import _grid_figure

    clean = torch.zeros(2, 1, 4, 4)
    changed = clean.clone()
    changed[0, 0, 1, 2], changed[1, 0, 3, 3] = 0.5, -0.25  # |difference| at most 0.5
    fig = _grid_figure(clean, changed, "t")
    try:
        axes = fig.axes
        label = axes[4].get_ylabel()  # the third row's first panel (2 panels a row)
        assert label.startswith("|difference|") and "white 0.5" in label and "black 0" in label
        first, second = (ax.get_images()[0].get_array() for ax in axes[4:6])
        assert first.max() == 1.0 and first[1, 2] == 1.0  # the largest difference is white
        assert second[3, 3] == 0.5  # |−0.25| is half the largest: mid-grey
        assert first[0, 0] == 0.0  # no difference: black
    finally:
        plt.close(fig)
