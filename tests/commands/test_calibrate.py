"""``diffcircuit calibrate``'s workflow: progress over a known number of images."""

from __future__ import annotations

from diffcircuit.commands.calibrate import CalibrateConfig, calibrate


def test_calibration_reports_each_image_observed_then_ablated(small_model_dir):
    cfg = CalibrateConfig(model=str(small_model_dir), data="synthetic", n=4, splits=3, timestep=300)
    done = []
    res = calibrate(cfg.model_spec, **cfg.settings(), progress=done.append)
    assert sum(done) == 2 * 4  # every image observed, then every image through the ablation sweep
    assert res.splits == 3 and res.n_images == 4
    assert [m.measure for m in res.measures if m.primary] == ["ablation_participation_ratio"]


def test_the_library_call_validates_its_settings_as_the_command_does():
    import pytest

    from diffcircuit import DiffcircuitError

    with pytest.raises(DiffcircuitError, match="n must be at least 4"):
        calibrate(n=3)  # refused before any model is loaded
    with pytest.raises(DiffcircuitError, match="splits at least 1"):
        calibrate(splits=0)
