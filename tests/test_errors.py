"""Errors name what was wrong in the library's terms; the CLI names flags."""

from __future__ import annotations

import json

import pytest
import torch

from diffcircuit import DiffcircuitError
from diffcircuit.errors import ConfigError, InputError, ModelError


def test_a_config_error_names_its_fields_as_flags_only_where_they_are_words():
    err = ConfigError("need n >= 2 and batch_size >= 1 (n images, not 'n')", "n", "batch_size")
    assert isinstance(err, DiffcircuitError) and isinstance(err, ValueError)
    assert err.with_flags() == "need --n >= 2 and --batch-size >= 1 (--n images, not 'n')"
    assert (
        ConfigError("names or levels", "names", "levels").with_flags(
            {"names": "--target", "levels": "--level"}
        )
        == "--target or --level"
    )
    assert (
        ConfigError("ablate_n is 0", "n").with_flags() == "ablate_n is 0"
    )  # n inside another word stays


def test_a_field_inside_a_path_stays_a_path():
    err = InputError("out /tmp/out/run is a file; choose another out", "out")
    assert err.with_flags() == "--out /tmp/out/run is a file; choose another --out"


def test_a_missing_or_empty_model_folder_is_a_model_error(tmp_path):
    from diffcircuit import load_denoiser

    with pytest.raises(ModelError, match="neither an existing folder"):
        load_denoiser(str(tmp_path / "nowhere"))
    with pytest.raises(ModelError, match="not a diffusers folder"):
        load_denoiser(str(tmp_path))


def test_pickle_weights_without_allow_pickle_are_a_model_error(small_model_dir, small_unet):
    from diffcircuit import load_denoiser

    unet = small_model_dir / "unet"
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(small_unet.state_dict(), unet / "diffusion_pytorch_model.bin")
    with pytest.raises(ModelError, match="allow_pickle") as caught:
        load_denoiser(str(small_model_dir))
    assert caught.value.fields == ("allow_pickle",)
    assert "set --allow-pickle" in caught.value.with_flags()


def test_an_image_folder_without_images_is_an_input_error(tmp_path):
    from diffcircuit import load_images

    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(InputError, match="no images"):
        load_images(str(tmp_path), n=2, size=16, channels=3)
    with pytest.raises(InputError, match="nor an existing folder"):
        load_images(str(tmp_path / "nowhere"), n=2, size=16, channels=3)


def test_too_many_faces_names_the_field_n_and_the_cli_the_flag():
    from diffcircuit import load_images
    from diffcircuit.data.faces import LFW_FACES

    with pytest.raises(ConfigError) as caught:
        load_images("faces", n=LFW_FACES + 1, size=16, channels=3)
    assert f"ask for n {LFW_FACES} or fewer" in str(caught.value) and "--" not in str(caught.value)
    assert f"ask for --n {LFW_FACES} or fewer" in caught.value.with_flags()


def test_a_run_directory_that_is_a_file_or_another_run_names_out(tmp_path):
    import diffcircuit as dc
    from diffcircuit.protocol.runner import run_protocol

    cfg = dc.RunConfig(n=2, ablate_n=1)
    (tmp_path / "a-file").write_text("not a folder")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "run.json").write_text("{}")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "run.json").write_text(json.dumps({"results_key": "another"}))
    for name, says in (
        ("a-file", "is a file, not a directory"),
        ("bad", "is not a diffcircuit run file; choose another out"),
        ("other", "holds a run with a different config; choose another out"),
    ):
        with pytest.raises(InputError, match=says) as caught:
            run_protocol(cfg, tmp_path / name)
        assert "--out" not in str(caught.value) and caught.value.fields == ("out",)
        assert caught.value.with_flags().count("--out") == 1, caught.value.with_flags()


def test_a_grid_that_is_not_a_png_names_out_and_the_cli_the_flag(small_model_dir, tmp_path, capsys):
    from diffcircuit.cli import main
    from diffcircuit.commands.generate import GenerateConfig, run_generate

    out = tmp_path / "grid.jpg"
    with pytest.raises(InputError, match="^out must name a .png file"):
        run_generate(
            GenerateConfig(model=str(small_model_dir), ablate=("mid_block.attentions.0",)), out
        )
    code = main(
        ["generate", "--out", str(out), "--model", str(small_model_dir), "--steps", "2"]
        + ["--ablate", "mid_block.attentions.0"]
    )
    err = capsys.readouterr().err
    assert code == 1 and err.strip().splitlines() == [
        f"diffcircuit: error: --out must name a .png file, not {str(out)!r}"
    ]


def test_the_cli_shows_a_model_error_in_one_line(tmp_path, capsys):
    from diffcircuit.cli import main

    code = main(["info", "--model", str(tmp_path / "nowhere")])
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1 and "neither an existing folder" in err


def test_a_ray_cluster_without_the_device_names_the_field_device(monkeypatch):
    import logging
    import sys
    from types import SimpleNamespace

    import diffcircuit as dc
    from diffcircuit.protocol.backends import RayBackend

    fake = SimpleNamespace(is_initialized=lambda: True, cluster_resources=lambda: {})
    monkeypatch.setitem(sys.modules, "ray", fake)  # a joined cluster with no CPU to offer
    with pytest.raises(ConfigError, match="no CPUs for device cpu$") as caught:
        RayBackend(dc.RunConfig(n=2, ablate_n=1, device="cpu"), logging.getLogger("test"))
    assert caught.value.with_flags().endswith("no CPUs for --device cpu")


LIBRARY_RAISES = {"ConfigError", "InputError", "ModelError", "IndexError", "TypeError"}


def _library_raises():
    """Every ``raise X(...)`` in the library (not the CLI's modules), with the text of its string arguments."""
    import ast
    from pathlib import Path

    import diffcircuit

    root = Path(diffcircuit.__file__).parent
    for path in sorted(root.rglob("*.py")):
        if path.name.startswith("cli"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
                func = node.exc.func
                name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "?")
                text = " ".join(
                    part.value
                    for arg in node.exc.args
                    for part in ast.walk(arg)
                    if isinstance(part, ast.Constant) and isinstance(part.value, str)
                )
                yield f"{path.relative_to(root)}:{node.lineno}", name, text


def test_library_errors_are_our_subclasses_and_name_no_command_line_flag():
    """Bad input, a bad setting or a model that cannot run raise InputError, ConfigError or ModelError (the CLI's
    one-line handler catches them; a bare ValueError would be a traceback); IndexError and TypeError keep their
    Python meaning (indexing, a wrong type). Messages name config fields, never ``--flags``."""
    import re

    found = list(_library_raises())
    assert len(found) > 100  # the walk sees the library
    wrong_kind = [(where, name) for where, name, _ in found if name not in LIBRARY_RAISES]
    assert wrong_kind == []
    flags = [(where, text) for where, _, text in found if re.search(r"(?<![\w-])--[a-z]", text)]
    assert flags == []
