"""How cheap the default run's ablation stage could be with exact, one-variant-per-forward evaluation.

An exact ablation must recompute everything from the first attention module it touches; perfect prefix
reuse skips everything before it and nothing after. This script times where each attention module of the
embedded model starts inside a plain forward of ``--n`` images (forward pre-hooks, median of repeats), so
that a variant first touching module L costs at least ``1 - start(L) / forward`` of a forward. Summed over
the default run's ablation plan (every head, layer, block, all heads and the random-set null of
``null_set_counts``), methods, datasets and timesteps, it prints that floor in plain 64-image forwards,
beside the share the random-set null takes. Compare it with the ablate stage's seconds ÷ forward64 in
``benchmarks/default_run.py``: the gap is what an exact engine could still win on this CPU.

    .venv/bin/python benchmarks/ablation_bound.py [--n 16] [--repeats 9]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from diffcircuit import load_denoiser, probe_registry
from diffcircuit.protocol.config import RunConfig
from diffcircuit.protocol.tasks import ablation_plan


def module_starts(net, layers: list[str], x, t, repeats: int) -> tuple[dict[str, float], float]:
    """Median time from the forward's start to each module's start, and the forward's median time."""
    modules = dict(net.named_modules())
    stamps: dict[str, float] = {}
    handles = [
        modules[name].register_forward_pre_hook(
            lambda m, a, name=name: stamps.__setitem__(name, time.perf_counter())
        )
        for name in layers
    ]
    starts: dict[str, list[float]] = {name: [] for name in layers}
    totals = []
    try:
        with torch.no_grad():
            net(x, t)
            net(x, t)
            for _ in range(repeats):
                begin = time.perf_counter()
                net(x, t)
                totals.append(time.perf_counter() - begin)
                for name in layers:
                    starts[name].append(stamps[name] - begin)
    finally:
        for h in handles:
            h.remove()
    return {k: statistics.median(v) for k, v in starts.items()}, statistics.median(totals)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--n", type=int, default=16, help="images per forward (the default ablate_n)"
    )
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    cfg = RunConfig()
    den = load_denoiser()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.n, den.in_channels, den.sample_size, den.sample_size, generator=g)
    t = torch.full((args.n,), 500)
    registry = probe_registry(den, x[:1])
    layers = [info.layer for info in registry.layers]
    starts, total = module_starts(den.network, layers, x, t, args.repeats)
    suffix = {layer: 1.0 - starts[layer] / total for layer in layers}
    plan, _ = ablation_plan(registry, null_sets=cfg.null_sets, seed=cfg.seed)
    per_kind: dict[str, list[float]] = {}
    for target in plan:
        first = min((a.layer for a in target.heads), key=lambda layer: starts[layer])
        per_kind.setdefault(target.level, []).append(suffix[first])
    repeats = len(cfg.ablation_methods) * 2 * len(cfg.timesteps)  # methods x datasets x timesteps
    images = min(cfg.ablate_n, cfg.n)
    print(f"forward of {args.n} images: {total * 1000:.1f} ms; attention modules start at:")
    for layer in sorted(layers, key=starts.get):
        print(f"  {layer:32s} {starts[layer] / total:6.3f} of the forward")
    floor = 0.0
    for kind, fractions in per_kind.items():
        forwards = sum(fractions) * images * repeats / 64
        floor += forwards
        print(
            f"{kind:7s} {len(fractions):4d} variants, mean suffix {statistics.mean(fractions):.3f}, "
            f"floor {forwards:7.1f} forward64"
        )
    random = sum(per_kind.get("random", [])) * images * repeats / 64
    print(f"random_null_share: {random / floor:.3f}")
    print(f"ablate_floor_forward64: {floor:.1f}")


if __name__ == "__main__":
    main()
