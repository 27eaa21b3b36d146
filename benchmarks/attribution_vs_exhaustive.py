"""Attribution patching against the exhaustive single-head ablation sweep, in one run.

On the embedded model and a batch of faces, per analysed timestep: the exhaustive sweep (one
forward per head) and the attribution estimates (first order: 1 forward + 1 backward; IG with m
steps; first order + Gauss-Newton term from K output probes: K more backwards), timed, and the
Spearman correlation of their head rankings (mean degradation over images) and the top-5 overlap.
The last lines are ``speedup: X`` (total time over all timesteps) and ``spearman: Y`` (the worst
timestep) for the estimator named by --headline (default: Gauss-Newton with 1 probe, which
``diffcircuit run`` also uses).

    .venv/bin/python benchmarks/attribution_vs_exhaustive.py [--n 64] [--method zero] [--ig-steps 4] [--probes 1,2]
"""

from __future__ import annotations

import argparse
import time

import torch
from scipy.stats import spearmanr

from diffcircuit import load_denoiser, load_images, probe_registry
from diffcircuit.interventions.ablation import targets
from diffcircuit.interventions.attribution import attribution_scores
from diffcircuit.interventions.sweep import ablation_sweep


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--data", default="faces")
    parser.add_argument("--method", default="zero", choices=["zero", "mean"])
    parser.add_argument("--timesteps", default="100,500,900")
    parser.add_argument("--ig-steps", type=int, default=4)
    parser.add_argument(
        "--probes", default="1,2", help="Gauss-Newton probe counts to try (comma-separated)"
    )
    parser.add_argument(
        "--headline", default="first_order+gn1", help="the estimator of the last two lines"
    )
    args = parser.parse_args()
    den = load_denoiser()
    data = load_images(args.data, n=args.n, size=den.sample_size, channels=den.in_channels)
    registry = probe_registry(
        den, torch.from_numpy(data.images[:1]), torch.zeros(1, dtype=torch.long)
    )
    heads = targets(registry, "head")
    common = dict(seed=0, batch_size=args.n, registry=registry)
    # ig_joint moves every head along one path (its scores split the all-heads ablation: its ranking against single
    # heads is shown for what it is); ig_per_head integrates along each head's own path (slower than exhaustive)
    estimators = {
        "first_order": dict(ig_steps=0),
        "ig_joint": dict(ig_steps=args.ig_steps),
        "ig_per_head": dict(ig_steps=args.ig_steps, ig_path="per_head"),
    }
    estimators |= {f"first_order+gn{k}": dict(probes=int(k)) for k in args.probes.split(",")}
    if args.headline not in estimators:
        parser.error(f"--headline must be one of {', '.join(estimators)}")
    totals = {"exhaustive": 0.0} | {name: 0.0 for name in estimators}
    worst = {name: 1.0 for name in estimators}
    for t in (int(x) for x in args.timesteps.split(",")):
        exact, dt = _timed(
            lambda t=t: ablation_sweep(
                den, data.images, targets=heads, methods=[args.method], timesteps=[t], **common
            )
        )
        totals["exhaustive"] += dt
        truth = exact.groupby("target").degradation_pct.mean()
        line = [f"t={t}: exhaustive {dt:.2f}s"]
        for name, options in estimators.items():
            est, dt_e = _timed(
                lambda t=t, options=options: attribution_scores(
                    den, data.images, timesteps=[t], method=args.method, **options, **common
                )
            )
            totals[name] += dt_e
            score = (
                est.assign(target=est.layer + ":" + est["head"].astype(str))
                .groupby("target")
                .degradation_pct.mean()
            )
            score = score.reindex(truth.index)
            rho = spearmanr(score, truth).statistic
            worst[name] = min(worst[name], rho)
            top = len(set(truth.nlargest(5).index) & set(score.nlargest(5).index))
            line.append(f"{name} {dt_e:.2f}s ({dt / dt_e:.1f}x) spearman {rho:.3f} top5 {top}/5")
        print("; ".join(line))
    for name in estimators:
        print(
            f"{name}: speedup {totals['exhaustive'] / totals[name]:.1f}x, worst spearman {worst[name]:.3f}"
        )
    print(f"headline estimator: {args.headline}")
    print(f"speedup: {totals['exhaustive'] / totals[args.headline]:.1f}")
    print(f"spearman: {worst[args.headline]:.3f}")


if __name__ == "__main__":
    main()
