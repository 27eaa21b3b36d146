"""The embedded model: the training command keeps working, and the shipped weights are good."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffcircuit import load_denoiser
from diffcircuit.data.faces import lfw_images
from diffcircuit.data.provenance import in_training_set, read_training_record
from diffcircuit.data.synthetic import synthetic_images
from diffcircuit.models.tiny import FACES_TRAIN, TrainConfig, train_tiny, training_pool

TINY = dict(
    steps=3,
    batch_size=4,
    synthetic_pool=8,
    photo_pool=8,
    warmup_steps=1,
    log_every=1,
    quality_images=4,
)


def test_train_tiny_few_steps_writes_a_loadable_model(tmp_path):
    cfg = TrainConfig(**TINY)
    out = train_tiny(tmp_path / "m", cfg)
    den = load_denoiser(str(out))
    assert (out / "README.md").read_text().count("| synthetic |") == 3
    quality = json.loads((out / "quality.json").read_text())
    datasets = ("synthetic", "synthetic_gray", "faces", "nonfaces")
    assert {(q["dataset"], q["timestep"]) for q in quality} == {
        (d, t) for d in datasets for t in (100, 500, 900)
    }
    assert {q["n_images"] for q in quality} == {
        4
    }  # every face is held out: the first 4 are evaluated
    # the same seed gives the same weights
    again = load_denoiser(str(train_tiny(tmp_path / "m2", cfg)))
    assert all(
        torch.equal(a, b) for a, b in zip(den.network.parameters(), again.network.parameters())
    )


def _held_out():
    """Synthetic images in colour and in gray (the default run's rendering beside the faces), faces and non-faces,
    minus what the shipped model's record lists."""
    record = read_training_record(load_denoiser().model_path.parent)
    trained = {w: set() for w in ("faces", "nonfaces")}
    for source in record["sources"]:
        if source["kind"] == "lfw":
            trained[source["which"]] |= set(range(*source["indices"]))
    held = {w: [i for i in range(100) if i not in trained[w]] for w in trained}
    assert len(held["faces"]) >= 20 and len(held["nonfaces"]) == 100
    return {
        "synthetic": torch.from_numpy(synthetic_images(100, seed=0)[0]),
        "synthetic_gray": torch.from_numpy(synthetic_images(100, seed=0, gray=True)[0]),
        **{w: torch.from_numpy(lfw_images(w)[held[w]]) for w in held},
    }


@pytest.mark.parametrize("timestep", [100, 500, 900])
def test_shipped_model_beats_the_trivial_predictor_on_held_out_images(timestep):
    """Computed independently of the package's metrics: diffusers' add_noise and a plain MSE."""
    den = load_denoiser()
    sched = den.scheduler
    for name, x0 in _held_out().items():
        g = torch.Generator().manual_seed(777 + timestep)
        eps = torch.randn(x0.shape, generator=g)
        t = torch.full((len(x0),), timestep, dtype=torch.long)
        x_t = sched.add_noise(x0, eps, t)
        with torch.no_grad():
            out = den.network(x_t, t).sample
        a = sched.alphas_cumprod[timestep]
        kind = sched.config.prediction_type
        # the ε an output implies (v = √ᾱ·ε − √(1−ᾱ)·x₀, so ε = √(1−ᾱ)·x_t + √ᾱ·v), written out here
        pred = {"epsilon": out, "v_prediction": (1 - a).sqrt() * x_t + a.sqrt() * out}[kind]
        mse = torch.mean((pred - eps) ** 2).item()
        trivial = torch.mean(((1 - sched.alphas_cumprod[timestep]).sqrt() * x_t - eps) ** 2).item()
        assert mse < trivial, (name, mse, trivial)
        if timestep == 500:
            assert mse < 0.02, (name, mse)


def test_fine_tuning_starts_from_the_given_weights(tmp_path):
    from diffusers import DDPMScheduler

    from diffcircuit.models.loading import save_denoiser
    from diffcircuit.models.tiny import build_tiny_unet

    base = build_tiny_unet(seed=5)
    save_denoiser(tmp_path / "base", base, DDPMScheduler())
    cfg = TrainConfig(
        steps=1,
        batch_size=2,
        synthetic_pool=2,
        photo_pool=2,
        warmup_steps=1,
        quality_images=2,
        lr=1e-12,
        init_from=str(tmp_path / "base"),
    )
    tuned = load_denoiser(str(train_tiny(tmp_path / "tuned", cfg))).network
    for a, b in zip(base.parameters(), tuned.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)  # lr ~ 0: still the starting weights
    assert "--init-from" in (tmp_path / "tuned" / "README.md").read_text()


def test_the_training_record_says_what_was_trained_on_and_what_was_inherited(tmp_path):
    out = train_tiny(tmp_path / "m", TrainConfig(**TINY))
    record = read_training_record(out)
    assert record["complete"] and {s["kind"] for s in record["sources"]} == {
        "synthetic",
        "photo_crops",
    }
    for spec in ("faces", "nonfaces"):
        assert in_training_set(record, spec, n=100) == 0
    assert all(in_training_set(record, "synthetic", n=2000, seed=s) == 0 for s in (0, 1, 1_000_003))
    # fine-tuning the old recipe's model inherits its faces; weights without a record make the data unknown
    old = train_tiny(tmp_path / "old", TrainConfig(**TINY, composition="faces80"))
    assert in_training_set(read_training_record(old), "faces", n=100) == FACES_TRAIN
    tuned = train_tiny(tmp_path / "tuned", TrainConfig(**TINY | dict(steps=1), init_from=str(old)))
    assert in_training_set(read_training_record(tuned), "faces", n=100) == FACES_TRAIN
    assert "inherits" in (tmp_path / "tuned" / "README.md").read_text()
    (old / "training_data.json").unlink()
    blind = train_tiny(tmp_path / "blind", TrainConfig(**TINY | dict(steps=1), init_from=str(old)))
    record = read_training_record(blind)
    assert not record["complete"] and in_training_set(record, "faces", n=100) is None


def _keys(images: np.ndarray) -> set[bytes]:
    """Exact pixels, and pixels rounded to 8 bits (a float rounding apart is still the same image)."""
    exact = {np.ascontiguousarray(im).tobytes() for im in images}
    return exact | {np.round((im + 1) * 127.5).astype(np.uint8).tobytes() for im in images}


@pytest.mark.slow
def test_the_default_training_pool_holds_no_analysed_image():
    """Against all 100 faces, 100 non-faces and synthetic seed-0 images 0-1999 in colour and gray, and their mirror images."""
    analysed = np.concatenate(
        [
            lfw_images("faces"),
            lfw_images("nonfaces"),
            synthetic_images(2000, seed=0)[0],
            synthetic_images(2000, seed=0, gray=True)[0],
        ]
    )
    analysed = np.concatenate([analysed, analysed[..., ::-1]])
    synth, natural = training_pool(TrainConfig())
    assert len(synth) == 10_000 and len(natural) == 10_000
    pool = np.concatenate([synth, natural])
    assert not (_keys(analysed) & _keys(pool))
    gray = (synth[:, 0] == synth[:, 1]).all(axis=(1, 2)) & (synth[:, 1] == synth[:, 2]).all(
        axis=(1, 2)
    )
    assert 0.45 < gray.mean() < 0.55  # gray_share 0.5 of the shapes


def test_a_bf16_training_step_autocasts_the_forward_and_stays_near_fp32():
    """The same step from the same weights and draws: bf16 autocast changes the loss a little (so it was
    applied), not much; the fp32 step is the recipe's."""
    from diffusers import DDPMScheduler

    from diffcircuit.models.tiny import _train_step, build_tiny_unet

    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    batch = torch.from_numpy(synthetic_images(4, seed=0)[0])
    losses = {}
    for precision in ("fp32", "bf16"):
        unet = build_tiny_unet(0).train()
        opt = torch.optim.AdamW(unet.parameters(), lr=1e-3)
        gen = torch.Generator().manual_seed(5)
        losses[precision] = _train_step(unet, opt, scheduler, batch, gen, precision=precision)
    assert np.isfinite(list(losses.values())).all()
    assert losses["bf16"] != losses["fp32"]
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.05)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("device", "tpu", "device must be cpu, cuda, cuda:N or auto"),
        ("precision", "fp16", "precision must be fp32 or bf16 for training"),
    ],
)
def test_training_devices_and_precisions_are_checked(field, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{field: value})
