"""Circuit discovery against planted ground truth on the embedded model.

A copy of the embedded model gets dead heads (output-projection columns zeroed; 8 drawn at random
outside the essential layer) and one essential head (the only live head of the layer whose mean
ablation costs most). Per timestep, heads are ranked by exhaustive single-head mean ablation and by
attribution (first order + Gauss-Newton, mean ablation), and the ROC AUC of ranking by |importance|
is computed with live heads as positives and dead heads as negatives; the essential head's rank
(1 = most important) is printed, and the τ circuit (--tau, default 0.02) is checked: does it contain the essential
head, and no dead one? The last lines are ``auc_exhaustive: X`` and ``auc_attribution: Y`` (the
worst timestep).

    .venv/bin/python benchmarks/planted_circuits.py [--n 16] [--timesteps 100,500,900]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from diffcircuit import load_denoiser, load_images, probe_registry
from diffcircuit.discovery.circuits import CircuitLoss, prune_circuit, ranking_auc
from diffcircuit.discovery.planted import plant
from diffcircuit.discovery.run import importance_rows
from diffcircuit.interventions.ablation import targets
from diffcircuit.interventions.attribution import attribution_scores
from diffcircuit.interventions.sweep import ablation_sweep
from diffcircuit.models.loading import Denoiser


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--data", default="faces")
    parser.add_argument("--timesteps", default="100,500,900")
    parser.add_argument("--dead", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tau", type=float, default=0.02)
    args = parser.parse_args()
    base = load_denoiser()
    images = load_images(args.data, n=args.n, size=base.sample_size, channels=base.in_channels).images
    registry = probe_registry(base.network, torch.from_numpy(images[:1]), torch.zeros(1, dtype=torch.long))
    worst = {"exhaustive": 1.0, "attribution": 1.0}
    for t in (int(x) for x in args.timesteps.split(",")):
        layers = ablation_sweep(base, images, targets=targets(registry, "layer"), methods=["mean"], timesteps=[t],
                                registry=registry).groupby("target").degradation_pct.mean()
        layer = layers.idxmax()
        others = [str(a) for a in registry if a.layer != layer]
        rng = np.random.default_rng(args.seed + t)
        dead = [others[i] for i in rng.choice(len(others), args.dead, replace=False)]
        planted = plant(base.network, dead=dead, essential_layer=layer, essential_head=0)
        den = Denoiser(network=planted.network, scheduler=base.scheduler, model_path=base.model_path, source="planted")
        rankings = {
            "exhaustive": importance_rows(ablation_sweep(den, images, targets=targets(registry, "head"), methods=["mean"],
                                                         timesteps=[t], registry=registry)),
            "attribution": importance_rows(scores := attribution_scores(den, images, timesteps=[t], method="mean", probes=1,
                                                                        registry=registry),
                                           estimator=scores.estimator.iloc[0]),
        }
        dead_set = {registry.parse(a) for a in planted.dead}
        essential = registry.parse(planted.essential)
        # every other head of the essential layer is dead too, by construction
        dead_set |= {a for a in registry if a.layer == layer and a != essential}
        loss = CircuitLoss(den, images, timesteps=[t], registry=registry)
        for name, rows in rankings.items():
            importance = {registry.parse(k): v for k, v in rows.groupby("target").degradation_pct.mean().items()}
            magnitude = {a: abs(v) for a, v in importance.items()}
            auc = ranking_auc(magnitude, {a for a in magnitude if a not in dead_set})
            rank = 1 + sum(v > magnitude[essential] for v in magnitude.values())
            circuit = prune_circuit(loss, importance, args.tau)
            worst[name] = min(worst[name], auc)
            print(f"t={t} {name}: essential layer {layer}; AUC live-vs-dead {auc:.3f}; essential head rank {rank}/"
                  f"{len(magnitude)}; circuit {len(circuit.heads)} heads, essential in: {essential in circuit.heads}, "
                  f"dead in: {len(dead_set & set(circuit.heads))}; faithfulness {circuit.faithfulness:.3f} "
                  f"(all heads ablated: {100 * (circuit.loss_empty / circuit.loss_full - 1):+.1f} %)")
    print(f"auc_exhaustive: {worst['exhaustive']:.3f}")
    print(f"auc_attribution: {worst['attribution']:.3f}")


if __name__ == "__main__":
    main()
