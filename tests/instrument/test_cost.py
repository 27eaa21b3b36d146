"""Counting forwards: every full forward and every partial one (prefix reuse) passes the output head once,
with its batch; the counting hook is gone afterwards."""

from __future__ import annotations

import numpy as np
import torch

from diffcircuit import Denoiser, probe_registry
from diffcircuit.instrument.cost import count_forwards, output_head
from diffcircuit.interventions.ablation import targets
from diffcircuit.interventions.sweep import ablation_sweep


def _hooks(net: torch.nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in net.modules())


def test_plain_forwards_are_counted_with_their_images_and_the_hook_is_removed(small_unet):
    before = _hooks(small_unet)
    with torch.no_grad(), count_forwards(small_unet) as cost:
        for batch in (3, 5):
            small_unet(torch.randn(batch, 3, 16, 16), torch.full((batch,), 10))
    assert (cost.forward_calls, cost.image_forwards) == (2, 8) and cost.seconds > 0
    assert _hooks(small_unet) == before
    assert output_head(small_unet) is small_unet.conv_out


def test_a_sweep_with_prefix_reuse_counts_one_clean_and_one_partial_forward_per_target_and_batch(
    small_unet,
):
    from diffusers import DDPMScheduler

    den = Denoiser(network=small_unet, scheduler=DDPMScheduler(), model_path=None, source="small")
    images = np.random.default_rng(0).uniform(-1, 1, (4, 3, 16, 16)).astype(np.float32)
    registry = probe_registry(
        small_unet, torch.from_numpy(images[:1]), torch.zeros(1, dtype=torch.long)
    )
    heads = targets(registry, "head")[:3]
    with count_forwards(small_unet) as cost:
        ablation_sweep(
            den,
            images,
            targets=heads,
            methods=["zero"],
            timesteps=[10],
            batch_size=2,
            registry=registry,
            stack_rows=1,
        )
    assert cost.forward_calls == 2 * (
        1 + 3
    )  # per batch of 2: the clean run, then one (partial) run per target
    assert cost.image_forwards == 2 * cost.forward_calls
    with count_forwards(
        small_unet
    ) as stacked:  # the three targets stacked: one forward of 3 x 2 rows per batch
        ablation_sweep(
            den,
            images,
            targets=heads,
            methods=["zero"],
            timesteps=[10],
            batch_size=2,
            registry=registry,
            stack_rows=6,
        )
    assert (stacked.forward_calls, stacked.image_forwards) == (2 * (1 + 1), 2 * (2 + 6))
