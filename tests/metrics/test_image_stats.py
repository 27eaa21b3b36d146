"""Image properties against direct NumPy/SciPy computations."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from diffcircuit.data.faces import lfw_images
from diffcircuit.data.synthetic import synthetic_images
from diffcircuit.metrics.image_stats import IMAGE_PROPERTIES, image_properties


def _reference(images: np.ndarray) -> dict[str, np.ndarray]:
    x = (images.astype(np.float64) + 1) / 2  # [n, 3, H, W] in [0, 1]
    lum = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    out = {k: [] for k in IMAGE_PROPERTIES}
    for im, L in zip(x, lum):
        gy = (
            ndimage.sobel(L, axis=0, mode="nearest") / 8
        )  # the probes' kernel is Sobel / 8, replicate padding
        gx = ndimage.sobel(L, axis=1, mode="nearest") / 8
        blurred = ndimage.gaussian_filter(L, sigma=1.0, mode="nearest", truncate=3.0)
        out["color_deviation"].append(np.abs(im - im.mean(0)).mean())
        out["edge_energy"].append(np.hypot(gx, gy).mean())
        out["texture_energy"].append(((L - blurred) ** 2).mean())
        out["intensity_mean"].append(L.mean())
        out["intensity_sd"].append(L.std())
    return {k: np.array(v) for k, v in out.items()}


def test_properties_equal_scipy_computations_on_colour_and_gray_images():
    images = np.concatenate(
        [synthetic_images(6, size=16, seed=3)[0], lfw_images("faces", size=16)[:4]]
    )
    mine, expected = image_properties(images, batch_size=4), _reference(images)
    for name in IMAGE_PROPERTIES:
        np.testing.assert_allclose(mine[name], expected[name], rtol=1e-4, atol=1e-7, err_msg=name)
    assert (mine["color_deviation"][6:] == 0).all()  # grayscale: exactly zero
    assert (mine["color_deviation"][:6] > 0.01).all()
