"""Prefix reuse (``interventions.prefix``): a forward restarted after its first touched module equals the full one."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler

from diffcircuit import Denoiser


def test_stages_reproduce_the_full_forward(small_unet):
    from diffcircuit.interventions.prefix import UNetStages

    stages = UNetStages(
        Denoiser(network=small_unet, scheduler=DDPMScheduler(), model_path=".", source="t")
    )
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 700])
    with torch.no_grad():
        record: dict = {}
        full = small_unet(x, t).sample
        torch.testing.assert_close(stages.run(x, t, record=record), full, atol=1e-6, rtol=0)
        for name in record[
            "order"
        ]:  # resuming after any sub-module, untouched, gives the clean output
            torch.testing.assert_close(stages.resume([name], record), full, atol=1e-6, rtol=0)
        assert "up_blocks.1.attentions.1" in record["order"]
        assert all(
            "forward" not in m.__dict__ for m in small_unet.modules()
        )  # replayed modules restored
    assert stages.names == [
        "down_blocks.0",
        "down_blocks.1",
        "mid_block",
        "up_blocks.0",
        "up_blocks.1",
    ]
    assert stages.stage_of("up_blocks.0.attentions.1") == 3 and stages.stage_of("conv_in") == 0


def test_a_unet_with_conditioning_or_a_flow_map_is_not_run_stage_by_stage(small_unet):
    """Stage by stage is the bare network's forward: an adapter or a conditioning would be skipped, so such a
    denoiser gets BlockMemo, which runs the whole forward through Denoiser.predict."""
    from diffcircuit.interventions.prefix import BlockMemo, UNetStages, prefix_runner
    from diffcircuit.models.conditioning import Conditioning

    bare = Denoiser(network=small_unet, scheduler=DDPMScheduler(), model_path=".", source="t")
    assert UNetStages(bare).supported and isinstance(prefix_runner(bare), UNetStages)
    fed = Denoiser(
        network=small_unet,
        scheduler=DDPMScheduler(),
        model_path=".",
        source="t",
        conditioning=Conditioning({}, "test"),
    )
    assert not UNetStages(fed).supported and isinstance(prefix_runner(fed), BlockMemo)
