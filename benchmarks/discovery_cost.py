"""Circuit discovery's cost at the demo's configuration: forward calls, images through them, seconds.

Builds the default run's context (the embedded model, synthetic vs faces, ``--ablate-n`` images per
dataset, the held-out mean reference), ranks heads by the exhaustive single-head mean ablation (cached
in ``--importance`` between invocations: it is the same table whatever discovery does), then runs
discovery as ``diffcircuit run`` does (one task per timestep, gap tests corrected over all of them) with
``--resamples`` bootstrap resamples, counting every forward through the network. It prints the cost and
each (dataset, timestep)'s circuit, so that two versions of the code can be compared at the same circuits.

The last lines are ``discovery_forward_calls: N``, ``discovery_image_forwards: N`` and
``discovery_seconds: S``.

    .venv/bin/python benchmarks/discovery_cost.py [--resamples 10] [--ablate-n 16] [--importance /tmp/imp.parquet]
        [--stack-rows 256] [--lookahead 1] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd
import torch

from diffcircuit.discovery.loss import STACK_ROWS
from diffcircuit.instrument.cost import count_forwards
from diffcircuit.interventions.ablation import targets
from diffcircuit.interventions.sweep import ablation_sweep
from diffcircuit.protocol.circuits import discover_circuits, importance_rows
from diffcircuit.protocol.config import RunConfig
from diffcircuit.protocol.tasks import Context


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resamples", type=int, default=RunConfig().circuit_resamples)
    parser.add_argument("--ablate-n", type=int, default=RunConfig().ablate_n)
    parser.add_argument("--timesteps", default="100,500,900")
    parser.add_argument(
        "--importance", default="", help="parquet file caching the single-head mean ablations"
    )
    parser.add_argument(
        "--stack-rows", type=int, default=STACK_ROWS, help="rows (images x head sets) per forward"
    )
    parser.add_argument(
        "--lookahead",
        type=int,
        default=None,
        help="evaluations a search may ask for ahead into spare rows (default: 1 on a CPU)",
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="torch intra-op threads (0: leave as set)"
    )
    args = parser.parse_args()
    timesteps = tuple(int(t) for t in args.timesteps.split(","))
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = RunConfig(
        device="cpu", ablate_n=args.ablate_n, timesteps=timesteps, circuit_resamples=args.resamples
    )
    ctx = Context.build(cfg)
    n = ctx.n_ablate
    cached = Path(args.importance) if args.importance else None
    if cached and cached.exists():
        importance = pd.read_parquet(cached)
    else:
        heads = targets(ctx.registry, "head")
        importance = importance_rows(
            pd.concat(
                [
                    ablation_sweep(
                        ctx.den,
                        s.images[:n],
                        targets=heads,
                        methods=["mean"],
                        timesteps=timesteps,
                        seed=cfg.seed,
                        dataset=key,
                        batch_size=cfg.batch_size,
                        registry=ctx.registry,
                        reference=ctx.references(key),
                    )
                    for key, s in ctx.sets.items()
                ],
                ignore_index=True,
            )
        )
        if cached:
            importance.to_parquet(cached)
    circuits = []
    with count_forwards(ctx.den.network) as cost:
        for t in (
            timesteps
        ):  # as the run's discover tasks: one window each, the gap family over all of them
            _, found, _ = discover_circuits(
                ctx.den,
                {k: s.images[:n] for k, s in ctx.sets.items()},
                importance[importance.timestep == t],
                registry=ctx.registry,
                windows=[(t,)],
                resamples=cfg.circuit_resamples,
                taus=cfg.circuit_taus,
                seed=cfg.seed,
                metric=cfg.circuit_metric,
                correction=cfg.correction,
                references={k: ctx.references(k) for k in ctx.sets},
                test_windows=[(s,) for s in timesteps],
                stack_rows=args.stack_rows,
                lookahead=args.lookahead,
            )
            circuits += found
    print(
        f"threads: {torch.get_num_threads()}  images per dataset: {n}  resamples: {cfg.circuit_resamples}  "
        f"stack_rows: {args.stack_rows}  lookahead: {args.lookahead}"
    )
    for c in circuits:
        c = c.to_dict() if hasattr(c, "to_dict") else c  # a CircuitRecord (older versions: a dict)
        print(
            json.dumps(
                {
                    "dataset": c["dataset"],
                    "window": c["window"],
                    "claimed": c["claimed"],
                    "heads": c["heads"],
                    "size_interval": c["size_interval"],
                    "size_range": c["size_range"],
                    "size_ci": c["size_ci"],
                    "boot_sizes": c["boot_sizes"],
                    "selection_frequency": c["selection_frequency"],
                    "by_tau": [b["size"] for b in c["by_tau"]],
                    "necessary": c["necessary"],
                }
            )
        )
    print(f"discovery_forward_calls: {cost.forward_calls}")
    print(f"discovery_image_forwards: {cost.image_forwards}")
    print(f"discovery_seconds: {cost.seconds:.1f}")


if __name__ == "__main__":
    main()
