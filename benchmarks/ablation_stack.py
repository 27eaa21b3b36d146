"""The default run's ablation shard, stacked and one variant per forward, timed in one run.

One ablate task of ``diffcircuit run`` at the demo's configuration: ``--ablate-n`` faces at one timestep,
every head, layer, block, all heads and the random head sets of the critical null (``ablation_plan``),
zero and mean ablation, the held-out mean reference. It runs twice: with variants stacked ``--stack-rows``
rows to a forward, and one variant per forward (``stack_rows=1``); the tables must agree to 1e-5.
The last line is ``stack_ratio: <stacked seconds / one-per-forward seconds>``.

    .venv/bin/python benchmarks/ablation_stack.py [--ablate-n 16] [--timestep 500] [--stack-rows 64]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from diffcircuit.instrument.cost import count_forwards
from diffcircuit.interventions.sweep import ablation_sweep
from diffcircuit.protocol.config import RunConfig
from diffcircuit.protocol.tasks import Context, ablation_plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ablate-n", type=int, default=RunConfig().ablate_n)
    parser.add_argument("--timestep", type=int, default=500)
    parser.add_argument("--stack-rows", type=int, default=64)
    args = parser.parse_args()
    cfg = RunConfig(device="cpu", ablate_n=args.ablate_n, timesteps=(args.timestep,))
    ctx = Context.build(cfg)
    plan, _ = ablation_plan(ctx.registry, null_sets=cfg.null_sets, seed=cfg.seed)
    images = ctx.sets["b"].images[: ctx.n_ablate]

    def sweep(stack_rows: int):
        with count_forwards(ctx.den.network) as cost:
            table = ablation_sweep(
                ctx.den,
                images,
                targets=plan,
                methods=cfg.ablation_methods,
                timesteps=[args.timestep],
                seed=cfg.seed,
                dataset="b",
                batch_size=cfg.batch_size,
                registry=ctx.registry,
                reference=ctx.references("b"),
                stack_rows=stack_rows,
            )
        return table, cost

    stacked, fast = sweep(args.stack_rows)
    single, slow = sweep(1)
    diff = np.abs(stacked.mse_intervened.to_numpy() - single.mse_intervened.to_numpy()).max()
    print(
        f"threads: {torch.get_num_threads()}  images: {len(images)}  targets: {len(plan)}  methods: {cfg.ablation_methods}"
    )
    print(
        f"stacked ({args.stack_rows} rows): {fast.seconds:.1f} s, {fast.forward_calls} forwards of {fast.image_forwards} "
        f"images; one per forward: {slow.seconds:.1f} s, {slow.forward_calls} forwards; max |difference| {diff:.2e}"
    )
    assert diff <= 1e-5 * max(1.0, float(np.abs(single.mse_intervened).max())), (
        "stacked and single disagree"
    )
    print(f"stack_ratio: {fast.seconds / slow.seconds:.3f}")


if __name__ == "__main__":
    main()
