"""The one way analyses noise images (``models.noise``): each image's draw is its own, whatever the batching."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import DDPMScheduler

from diffcircuit import Denoiser
from diffcircuit.models.noise import batch_rows, image_noise, noisy_batch, noisy_batches


def _den(small_unet):
    return Denoiser(
        network=small_unet,
        scheduler=DDPMScheduler(num_train_timesteps=1000),
        model_path=".",
        source="t",
    )


def test_batches_cover_every_image_and_timestep_once_with_each_images_own_draw(small_unet):
    den = _den(small_unet)
    images = np.random.default_rng(0).uniform(-1, 1, (5, 3, 16, 16)).astype(np.float32)
    seen = []
    for batch in noisy_batches(
        den, images, timesteps=[10, 700], seed=3, dataset="b", batch_size=2, first=4
    ):
        for k, row in enumerate(batch.rows):
            eps = image_noise(
                (3, 16, 16), seed=3, dataset="b", image=int(row), timestep=batch.timestep
            )
            torch.testing.assert_close(batch.eps[k], eps, atol=0, rtol=0)
            torch.testing.assert_close(
                batch.x0[k], torch.from_numpy(images[row - 4]), atol=0, rtol=0
            )
            seen.append((batch.timestep, int(row)))
        reference = den.scheduler.add_noise(batch.x0, batch.eps, batch.t)  # diffusers' own noising
        torch.testing.assert_close(batch.x_t, reference, atol=1e-6, rtol=1e-6)
        assert batch.which == ("b", batch.rows)
    assert sorted(seen) == [(t, r) for t in (10, 700) for r in range(4, 9)]


def test_order_and_batch_size_do_not_change_an_images_input(small_unet):
    den = _den(small_unet)
    images = np.random.default_rng(1).uniform(-1, 1, (4, 3, 16, 16)).astype(np.float32)

    def inputs(**kw):
        return {
            (b.timestep, int(r)): b.x_t[k]
            for b in noisy_batches(den, images, timesteps=[5, 50], seed=0, dataset="a", **kw)
            for k, r in enumerate(b.rows)
        }

    one, other = inputs(batch_size=4), inputs(batch_size=3, by_timestep=False)
    assert one.keys() == other.keys()
    for key in one:
        torch.testing.assert_close(one[key], other[key], atol=0, rtol=0)


def test_a_noise_label_gives_two_datasets_one_draw():
    den_like = type(
        "D",
        (),
        {
            "network": torch.nn.Linear(1, 1),
            "alphas_cumprod": DDPMScheduler(num_train_timesteps=1000).alphas_cumprod,
        },
    )()
    x = torch.zeros(2, 1, 4, 4)
    a = noisy_batch(den_like, x, [0, 1], 500, seed=0, dataset="a", noise="pair")
    b = noisy_batch(den_like, x, [0, 1], 500, seed=0, dataset="b", noise="pair")
    c = noisy_batch(den_like, x, [0, 1], 500, seed=0, dataset="b")
    torch.testing.assert_close(a.eps, b.eps, atol=0, rtol=0)
    assert not torch.equal(b.eps, c.eps) and a.which[0] == "a" and b.which[0] == "b"
    assert [r.tolist() for r in batch_rows(5, 2, first=10)] == [[10, 11], [12, 13], [14]]
