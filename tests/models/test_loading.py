from __future__ import annotations

import json
import shutil

import pytest
import torch

from diffcircuit import DiffcircuitError, load_denoiser


def test_pipeline_folder_loads_with_its_scheduler(small_model_dir):
    cfg_path = small_model_dir / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["num_train_timesteps"] = 500
    cfg_path.write_text(json.dumps(cfg))
    den = load_denoiser(str(small_model_dir))
    assert den.model_path == small_model_dir / "unet"
    assert den.scheduler.config.num_train_timesteps == 500
    assert den.sample_size == 16 and den.in_channels == 3
    assert not any(p.requires_grad for p in den.network.parameters())


def test_model_folder_without_scheduler_gets_ddpm_1000(small_model_dir, tmp_path):
    folder = tmp_path / "bare"
    shutil.copytree(small_model_dir / "unet", folder)
    den = load_denoiser(str(folder))
    assert den.scheduler.config.num_train_timesteps == 1000
    assert den.scheduler.config.beta_schedule == "linear"


def test_loaded_weights_equal_the_saved_ones(small_model_dir, small_unet):
    den = load_denoiser(str(small_model_dir))
    for (name, a), b in zip(small_unet.state_dict().items(), den.network.state_dict().values()):
        assert torch.equal(a, b), name


def _make_pickle_only(small_model_dir, small_unet):
    unet = small_model_dir / "unet"
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(small_unet.state_dict(), unet / "diffusion_pytorch_model.bin")
    return small_model_dir


def test_pickle_weights_are_refused_unless_allowed(small_model_dir, small_unet):
    folder = _make_pickle_only(small_model_dir, small_unet)
    with pytest.raises(DiffcircuitError, match="allow_pickle"):
        load_denoiser(str(folder))
    den = load_denoiser(str(folder), allow_pickle=True)
    assert torch.equal(den.network.conv_in.weight, small_unet.conv_in.weight)


@pytest.mark.parametrize(
    "source, message",
    [
        ("/no/such/folder", "neither an existing folder nor a hub id"),
        ("not a hub id", "neither an existing folder nor a hub id"),
    ],
)
def test_bad_sources_give_one_clear_error(source, message):
    with pytest.raises(DiffcircuitError, match=message):
        load_denoiser(source)


def test_folder_that_is_not_diffusers_is_refused(tmp_path):
    with pytest.raises(DiffcircuitError, match="not a diffusers folder"):
        load_denoiser(str(tmp_path))


def test_hub_ids_go_through_snapshot_download(monkeypatch, small_model_dir):
    """A hub id is fetched with huggingface_hub, then loaded like a local folder (offline here)."""
    import huggingface_hub

    calls = []

    def fake_download(repo_id, **kwargs):
        calls.append(repo_id)
        return str(small_model_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    den = load_denoiser("google/ddpm-celebahq-256")
    assert calls == ["google/ddpm-celebahq-256"] and den.source == "google/ddpm-celebahq-256"


def test_unreachable_hub_gives_one_line_error(monkeypatch):
    import huggingface_hub

    def failing(repo_id, **kwargs):
        raise OSError("We couldn't connect to the hub.\nCheck your connection")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", failing)
    with pytest.raises(DiffcircuitError) as info:
        load_denoiser("owner/model")
    assert "\n" not in str(info.value) and "owner/model" in str(info.value)


def test_hub_repo_without_safetensors_is_refused_unless_pickle_allowed(
    monkeypatch, small_model_dir, small_unet
):
    import huggingface_hub

    folder = _make_pickle_only(small_model_dir, small_unet)
    patterns = []

    def fake_download(repo_id, allow_patterns, **kwargs):
        patterns.append(allow_patterns)
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    with pytest.raises(DiffcircuitError, match="allow_pickle"):
        load_denoiser("owner/pickled")
    assert all("*.bin" not in p for p in patterns)  # nothing pickled was even fetched
    den = load_denoiser("owner/pickled", allow_pickle=True)
    assert "*.bin" in patterns[-1] and den.source == "owner/pickled"


def test_non_finite_weights_are_refused(small_model_dir, small_unet):
    from diffusers import DDPMScheduler

    from diffcircuit.models.loading import save_denoiser

    with torch.no_grad():
        small_unet.conv_out.weight[0, 0, 0, 0] = float("nan")
    folder = save_denoiser(small_model_dir.parent / "nan-model", small_unet, DDPMScheduler())
    with pytest.raises(DiffcircuitError, match="NaN or infinite values.*conv_out.weight"):
        load_denoiser(str(folder))


def test_unsupported_prediction_type_is_refused(small_model_dir):
    cfg_path = small_model_dir / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["prediction_type"] = "flow_prediction"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(DiffcircuitError, match="prediction_type"):
        load_denoiser(str(small_model_dir))


def test_weights_hash_identifies_the_weights(small_model_dir, small_unet):
    import hashlib

    den = load_denoiser(str(small_model_dir))
    assert den.weights_sha256() == load_denoiser(str(small_model_dir)).weights_sha256()
    with torch.no_grad():
        next(den.network.parameters()).view(-1)[0] += 1e-3
    assert den.weights_sha256() != load_denoiser(str(small_model_dir)).weights_sha256()
    assert len(den.weights_sha256()) == len(hashlib.sha256().hexdigest())
