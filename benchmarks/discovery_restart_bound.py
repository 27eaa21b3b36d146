"""What restarting discovery's forwards from an earlier evaluated head set could save, at most.

Discovery's engine restarts each stacked forward where its rows' head sets first touch the network, from
the clean forward's recorded state (``discovery/loss.py``). A search that has accepted a set A and now asks
for A ∪ R could instead restart from A's own recorded state, at the first module R touches. This script
runs discovery as ``benchmarks/discovery_cost.py`` does (embedded model, synthetic vs faces, exhaustive
mean-ablation ranking, windows 100, 500, 900, ``--resamples`` bootstrap resamples) and, for every row the
engine evaluates (one image under one head set at one timestep), prices two restarts with the suffix cost of
the first attention module touched (``1 − start / forward``, timed as in ``benchmarks/ablation_bound.py``):

- from the clean record: the first module the set touches (what the engine does now);
- from the best earlier row of the same loss, image and timestep whose set A ⊂ S: the first module S \\ A
  touches (an upper bound on any record cache: every earlier row is kept, accepted or not).

It prints ``restart_work_ratio: <anchor ÷ clean>``; the saving on the whole run is that share of discovery's
share of the run (``manifest.json`` → ``cost``).

    .venv/bin/python benchmarks/discovery_restart_bound.py [--n 8] [--resamples 3] [--threads 2]
"""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd
import torch
from ablation_bound import module_starts

from diffcircuit import load_denoiser, load_images, probe_registry
from diffcircuit.discovery import loss as engine
from diffcircuit.interventions.ablation import targets
from diffcircuit.interventions.sweep import ablation_sweep
from diffcircuit.protocol.circuits import discover_circuits, importance_rows

WINDOWS = (100, 500, 900)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8, help="images per dataset")
    parser.add_argument("--resamples", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    den = load_denoiser()
    shape = dict(size=den.sample_size, channels=den.in_channels, seed=0)
    images = {
        "a": load_images("synthetic", n=args.n, **shape).images,
        "b": load_images("faces", n=args.n, **shape).images,
    }
    registry = probe_registry(den)
    layers = [info.layer for info in registry.layers]
    x = torch.randn(16, den.in_channels, den.sample_size, den.sample_size)
    starts, total = module_starts(den.network, layers, x, torch.full((16,), 500), repeats=5)
    suffix = {layer: 1.0 - starts[layer] / total for layer in layers}

    def cost(heads) -> float:  # the share of a forward from the first module ``heads`` touches
        return max((suffix[h.layer] for h in heads), default=0.0)

    priced: list[tuple[float, float]] = []
    earlier: dict[tuple, list[frozenset]] = {}
    forward = engine._forward

    def pricing_forward(rows, chunk):
        for r in chunk:
            key = rows.key[r]
            seen = earlier.setdefault((id(rows.loss[r]), rows.step[r], rows.image[r]), [])
            anchors = [cost(key - a) for a in seen if a < key]
            priced.append((cost(key), min([cost(key), *anchors])))
            seen.append(key)
        return forward(rows, chunk)

    importance = pd.concat(
        importance_rows(
            ablation_sweep(
                den,
                x0,
                targets=targets(registry, "head"),
                methods=["mean"],
                timesteps=list(WINDOWS),
                dataset=name,
                registry=registry,
            )
        )
        for name, x0 in images.items()
    )
    engine._forward = pricing_forward
    try:
        discover_circuits(
            den,
            images,
            importance,
            registry=registry,
            windows=[(t,) for t in WINDOWS],
            resamples=args.resamples,
        )
    finally:
        engine._forward = forward
    work = np.array(priced)
    clean, anchored = work.sum(0)
    print(f"rows evaluated: {len(work)}; threads: {torch.get_num_threads()}")
    print(f"restart_from_clean_forwards: {clean:.1f}")
    print(f"restart_from_best_earlier_set_forwards: {anchored:.1f}")
    print(f"restart_work_ratio: {anchored / clean:.3f}")


if __name__ == "__main__":
    main()
