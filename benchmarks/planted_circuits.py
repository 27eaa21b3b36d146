"""Circuit discovery against planted ground truth on the embedded model.

Model A, per timestep: a copy of the embedded model gets dead heads (output-projection columns
zeroed; 8 drawn at random), one essential head (the only live head of the layer whose mean ablation
costs most) and a redundant pair (in the layer costing second most, its least important head
overwritten with a copy of its most important one, both outputs halved). Heads are ranked by
exhaustive single-head mean ablation and by attribution (first order, first order + Gauss-Newton,
integrated gradients; mean ablation), and the ROC AUC of ranking by |importance| is computed with
live heads as positives and dead heads as negatives. For each ranking the essential head's rank
(1 = most important), the pair's ranks and the τ circuit (--tau, a share of the gap L_empty − L_full,
default 0.05) are printed: does it contain the essential head, how many dead heads and how many of
the pair, and how many of its heads are individually necessary.

Model B, per timestep: the redundant pair alone (in the costliest layer; every other head dead).
Either copy alone costs a share s of the gap, both together all of it; at τ = √(s · 1), between
the two, discovery should keep exactly one copy, and with both kept neither is individually
necessary although the two together are.

The last lines are ``auc_<ranking>: X`` (the worst timestep) for each ranking.

    .venv/bin/python benchmarks/planted_circuits.py [--n 16] [--timesteps 100,500,900]
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch

from diffcircuit import load_denoiser, load_images, probe_registry
from diffcircuit.discovery.circuits import CircuitLoss, necessary_heads, prune_circuit, ranking_auc
from diffcircuit.discovery.planted import plant
from diffcircuit.interventions.ablation import targets
from diffcircuit.interventions.attribution import attribution_scores
from diffcircuit.interventions.sweep import ablation_sweep
from diffcircuit.models.loading import Denoiser
from diffcircuit.protocol.circuits import importance_rows

ATTRIBUTIONS = {
    "first_order": dict(probes=0),
    "first_order+gn": dict(probes=1),
    "ig": dict(ig_steps=4, probes=0),
}


def _rankings(den, images, registry, t) -> dict[str, dict]:
    """Mean importance per head for every ranking method."""
    rows = {
        "exhaustive": importance_rows(
            ablation_sweep(
                den,
                images,
                targets=targets(registry, "head"),
                methods=["mean"],
                timesteps=[t],
                registry=registry,
            )
        )
    }
    for name, options in ATTRIBUTIONS.items():
        scores = attribution_scores(
            den, images, timesteps=[t], method="mean", registry=registry, **options
        )
        rows[name] = importance_rows(scores, estimator=scores.estimator.iloc[0])
    return {
        name: {registry.parse(k): v for k, v in r.groupby("target").degradation_pct.mean().items()}
        for name, r in rows.items()
    }


def _rank(magnitude: dict, head) -> int:
    return 1 + sum(v > magnitude[head] for v in magnitude.values())


def _model_a(base, images, registry, t, layers, args, worst) -> None:
    order = list(layers.sort_values(ascending=False).index)
    layer, pair_layer = order[0], order[1]
    heads = (
        ablation_sweep(
            base,
            images,
            targets=[x for x in targets(registry, "head") if x.name.startswith(pair_layer + ":")],
            methods=["mean"],
            timesteps=[t],
            registry=registry,
        )
        .groupby("target")
        .degradation_pct.mean()
    )
    a, b = (int(h.rsplit(":", 1)[1]) for h in (heads.idxmax(), heads.idxmin()))
    others = [str(h) for h in registry if h.layer not in (layer, pair_layer)]
    rng = np.random.default_rng(args.seed + t)
    dead = [others[i] for i in rng.choice(len(others), args.dead, replace=False)]
    planted = plant(
        base.network,
        dead=dead,
        essential_layer=layer,
        essential_head=0,
        redundant=(pair_layer, a, b),
    )
    den = Denoiser(
        network=planted.network,
        scheduler=base.scheduler,
        model_path=base.model_path,
        source="planted",
    )
    essential, pair = (
        registry.parse(planted.essential),
        {registry.parse(h) for h in planted.redundant},
    )
    dead_set = {registry.parse(h) for h in planted.dead} | {
        h for h in registry if h.layer == layer and h != essential
    }
    loss = CircuitLoss(den, images, timesteps=[t], registry=registry)
    for name, importance in _rankings(den, images, registry, t).items():
        magnitude = {h: abs(v) for h, v in importance.items()}
        auc = ranking_auc(magnitude, {h for h in magnitude if h not in dead_set})
        worst[name] = min(worst.get(name, 1.0), auc)
        circuit = prune_circuit(loss, importance, args.tau)
        necessary = necessary_heads(loss, circuit.heads, args.tau)
        print(
            f"t={t} A {name}: AUC live-vs-dead {auc:.3f}; essential ({layer}) rank {_rank(magnitude, essential)}/"
            f"{len(magnitude)}; pair ({pair_layer}:{a},{b}) ranks {sorted(_rank(magnitude, h) for h in pair)}; "
            f"circuit {len(circuit.heads)} heads (gap {100 * circuit.gap / circuit.loss_full:+.1f} % of L_full), "
            f"essential in: {essential in circuit.heads}, dead in: {len(dead_set & set(circuit.heads))}, "
            f"pair kept: {len(pair & set(circuit.heads))}, necessary {len(necessary)}/{len(circuit.heads)}, "
            f"faithfulness {circuit.faithfulness:.3f}"
        )


def _model_b(base, images, registry, t, layer) -> None:
    heads = (
        ablation_sweep(
            base,
            images,
            targets=[x for x in targets(registry, "head") if x.name.startswith(layer + ":")],
            methods=["mean"],
            timesteps=[t],
            registry=registry,
        )
        .groupby("target")
        .degradation_pct.mean()
    )
    a, b = (int(h.rsplit(":", 1)[1]) for h in (heads.idxmax(), heads.idxmin()))
    names = (f"{layer}:{a}", f"{layer}:{b}")
    planted = plant(
        base.network,
        dead=[str(h) for h in registry if str(h) not in names],
        redundant=(layer, a, b),
    )
    den = Denoiser(
        network=planted.network,
        scheduler=base.scheduler,
        model_path=base.model_path,
        source="planted",
    )
    pair = tuple(registry.parse(h) for h in names)
    loss = CircuitLoss(den, images, timesteps=[t], registry=registry)
    full, empty = loss([]), loss(loss.heads)
    alone = max(loss([h]) - full for h in pair) / (empty - full)
    tau = math.sqrt(alone)  # between either alone (alone) and both together (1, the whole gap)
    importance = _rankings(den, images, registry, t)["exhaustive"]
    circuit = prune_circuit(loss, importance, tau)
    both = tuple(sorted({*circuit.heads, *pair}))
    print(
        f"t={t} B pair {names[0]},{b}: either alone costs {alone:.3f} of the gap, both 1; at tau {tau:.3f}: "
        f"pair kept {len(set(pair) & set(circuit.heads))} (of {len(circuit.heads)} heads); with both kept, "
        f"{len(necessary_heads(loss, both, tau))} of the pair individually necessary"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--data", default="faces")
    parser.add_argument("--timesteps", default="100,500,900")
    parser.add_argument("--dead", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tau", type=float, default=0.05)
    args = parser.parse_args()
    base = load_denoiser()
    images = load_images(
        args.data, n=args.n, size=base.sample_size, channels=base.in_channels
    ).images
    registry = probe_registry(
        base.network, torch.from_numpy(images[:1]), torch.zeros(1, dtype=torch.long)
    )
    worst: dict[str, float] = {}
    for t in (int(x) for x in args.timesteps.split(",")):
        layers = (
            ablation_sweep(
                base,
                images,
                targets=targets(registry, "layer"),
                methods=["mean"],
                timesteps=[t],
                registry=registry,
            )
            .groupby("target")
            .degradation_pct.mean()
        )
        _model_a(base, images, registry, t, layers, args, worst)
        _model_b(base, images, registry, t, layers.idxmax())
    for name, auc in worst.items():
        print(f"auc_{name}: {auc:.3f}")


if __name__ == "__main__":
    main()
