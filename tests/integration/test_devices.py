"""Devices and precision: every stage runs where the model is (CUDA tests skip without a GPU), and autocast
to bf16/fp16 changes the forward passes while the statistics stay fp32 (checked on the CPU for bf16 with one
shard in tests/protocol/test_tasks.py)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from diffcircuit import RunConfig
from diffcircuit.protocol.circuits import importance_rows
from diffcircuit.protocol.tasks import (
    Context,
    ablate_tasks,
    attribute_tasks,
    compute,
    discover_tasks,
    observe_tasks,
    patch_tasks,
)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _config(model_dir, **kw) -> RunConfig:
    return RunConfig(
        model=str(model_dir),
        n=3,
        timesteps=(20, 800),
        batch_size=2,
        seed=3,
        ablate_n=2,
        circuit_resamples=2,
        **kw,
    )


def _agree(cpu: dict, gpu: dict) -> None:
    for stage in cpu:
        a, b = cpu[stage], gpu[stage]
        assert list(a.columns) == list(b.columns) and len(a) == len(b), stage
        np.testing.assert_allclose(
            _numeric(b), _numeric(a), rtol=2e-3, atol=2e-4, equal_nan=True, err_msg=stage
        )


def _tables(ctx: Context) -> dict[str, pd.DataFrame]:
    """Every stage's shards computed in this process, by stage."""
    out = {}
    groups = {
        "observe": observe_tasks(ctx, seed=3),
        "ablate": ablate_tasks(ctx),
        "patch": patch_tasks(ctx),
        "attribute": attribute_tasks(ctx),
    }
    for stage, tasks in groups.items():
        out[stage] = pd.concat([compute(ctx, t)[t.parts[0]] for t in tasks], ignore_index=True)
    found = discover_tasks(ctx, importance_rows(out["ablate"]))
    out["discover"] = pd.concat(
        [compute(ctx, t)["curves.parquet"] for t in found], ignore_index=True
    )
    return out


def _numeric(frame: pd.DataFrame) -> np.ndarray:
    return frame.select_dtypes("number").to_numpy(dtype=np.float64)


def test_an_unavailable_or_unknown_device_is_refused_in_one_line(
    small_model_dir_module, tmp_path, capsys
):
    from diffcircuit.cli import main

    base = [
        "run",
        "--out",
        str(tmp_path / "run"),
        "--model",
        str(small_model_dir_module),
        "--n",
        "2",
        "--ablate-n",
        "1",
        "--quiet",
    ]
    assert main([*base, "--device", "tpu"]) != 0
    assert "--device must be" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main([*base, "--device", "cuda"]) != 0
        err = capsys.readouterr().err
        assert "no CUDA GPU" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.gpu
@cuda
def test_every_stage_on_cuda_agrees_with_the_cpu(small_model_dir_module):
    _agree(
        _tables(Context.build(_config(small_model_dir_module, device="cpu"))),
        _tables(Context.build(_config(small_model_dir_module, device="cuda"))),
    )


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_joint_attention_flow_and_latent_models_on_cuda_agree_with_the_cpu(
    family, sd3_folder, flux_folder
):
    """SD3 (flow matching, joint attention) and Flux (packed latents through its VAE, rotary embeddings)."""
    folder = {"sd3": sd3_folder, "flux": flux_folder}[family]
    embeds = str(folder.parent / "embeds.safetensors")
    _agree(
        _tables(Context.build(_config(folder, device="cpu", prompt_embeds=embeds))),
        _tables(Context.build(_config(folder, device="cuda", prompt_embeds=embeds))),
    )


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_a_run_on_cuda_with_autocast_completes(small_model_dir_module, tmp_path, precision):
    from diffcircuit.cli import main

    out = tmp_path / "run"
    assert (
        main(
            [
                "run",
                "--out",
                str(out),
                "--model",
                str(small_model_dir_module),
                "--n",
                "3",
                "--timesteps",
                "20,800",
                "--ablate-n",
                "2",
                "--device",
                "cuda",
                "--precision",
                precision,
                "--quiet",
            ]
        )
        == 0
    )
    heads = pd.read_parquet(out / "tables" / "head_metrics.parquet")
    assert np.isfinite(heads.entropy_nats).all()
