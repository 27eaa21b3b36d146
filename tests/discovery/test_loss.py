"""The circuit loss engine (``discovery.loss``): stacked, memoised circuit losses.

References: one head set per plain forward (the session's per-head ``patches``, means from a plain
cached forward; the ``plain_loss`` fixture) and forward counts from ``count_forwards``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffcircuit import probe_registry
from diffcircuit.discovery.loss import CircuitLoss
from diffcircuit.instrument.cost import count_forwards

T = 300


def _some_sets(registry, seed=0):
    rng = np.random.default_rng(seed)
    heads = list(registry)
    picks = [
        [heads[j] for j in rng.choice(len(heads), min(k, len(heads) - 1), replace=False)]
        for k in (1, 3, 9, 30)
    ]
    return [[], heads, [heads[-1]], *picks]


@pytest.mark.parametrize("method", ["mean", "zero"])
def test_stacked_losses_equal_one_set_per_plain_forward_on_the_unet(embedded, plain_loss, method):
    """Many sets on a window of two timesteps and on overlapping image subsets, several sets to a forward and a set
    completed on images it lacked, equal each set's own plain forwards to 1e-5."""
    den, images, registry = embedded
    sets = _some_sets(registry)
    plain = plain_loss(den, images, registry, [T, 700], method=method)
    loss = CircuitLoss(
        den, images, timesteps=[T, 700], registry=registry, method=method, stack_rows=10
    )
    with count_forwards(den.network) as cost:
        loss.prefetch(sets[:4], images=[0, 2, 5])  # a resample's distinct images first
        first = cost.image_forwards
        loss.prefetch(sets)  # then everything: the first sets only on the images they lack
    # the empty set ran in the clean forward that gave the in-sample means; every other (set, timestep, image) once
    assert (first, cost.image_forwards) == (2 * 3 * 3, 2 * 6 * 6)
    assert cost.forward_calls == -(-first // 10) + -(
        -(cost.image_forwards - first) // 10
    )  # 10 rows a forward
    for s in sets:
        np.testing.assert_allclose(loss.per_image(s), plain.per_image(s), rtol=1e-5, atol=1e-8)
    assert loss.evaluations == len(sets)


@pytest.mark.parametrize("family", ["sd3", "flux", "dit", "pixart-captioned"])
def test_stacked_losses_equal_one_set_per_plain_forward_on_transformers(
    family, sd3_folder, flux_folder, tmp_path, request, captioned_folder, plain_loss
):
    """The same on transformer families; with PixArt, each image of a captioned dataset keeps its own caption in
    every variant's copy of the rows."""
    from diffcircuit import model_images
    from tests.interventions.test_sweep import _transformer

    dataset = "a"
    if family == "pixart-captioned":
        from diffcircuit.models import load_conditioned, use_captions

        den = load_conditioned(str(request.getfixturevalue("pixart_text_folder")))
        folder = captioned_folder(
            tmp_path / "pairs", {"0.png": "a", "1.png": "bcdef", "2.png": "gh"}
        )
        found = model_images(den, str(folder), n=3)
        dataset = "b"
        assert use_captions(den, dataset, found.captions) == "each image's own caption"
    else:
        den = _transformer(family, sd3_folder, flux_folder, tmp_path)
        found = model_images(den, "synthetic", n=3)
    images = np.asarray(found.images, dtype=np.float32)
    registry = probe_registry(den, torch.from_numpy(images[:1]), torch.zeros(1, dtype=torch.long))
    sets = _some_sets(registry)
    plain = plain_loss(den, images, registry, [T], dataset=dataset)
    loss = CircuitLoss(den, images, timesteps=[T], registry=registry, stack_rows=7, dataset=dataset)
    loss.prefetch(sets[2:], images=[1])
    loss.prefetch(sets)
    for s in sets:
        np.testing.assert_allclose(loss.per_image(s), plain.per_image(s), rtol=1e-5, atol=1e-8)


def test_memo_hits_cost_no_forward_and_a_set_is_completed_not_recomputed(embedded):
    den, images, registry = embedded
    loss = CircuitLoss(den, images, timesteps=[T], registry=registry)
    s = list(registry)[:5]
    loss.per_image([])  # the clean forward
    with count_forwards(den.network) as first:
        loss.resampled([1, 1, 3, 4, 4, 4])(s)
    with count_forwards(den.network) as completion:
        loss.resampled([0, 1, 2, 3, 3, 0])(s)  # images 0 and 2 are new
        loss(s)  # and image 5
    with count_forwards(den.network) as hits:
        (
            loss(s),
            loss.per_image(s, [4, 0]),
            loss.resampled([2, 2, 2, 2, 2, 5])(s),
            loss.prefetch([s, []]),
        )
    assert (first.forward_calls, first.image_forwards) == (1, 3)
    assert (completion.forward_calls, completion.image_forwards) == (2, 3)
    assert hits.forward_calls == 0 and loss.evaluations == 2
