"""The statistics stage at the paper's scale, on synthetic tables: seconds per part and in all.

Builds the tables a run hands to its statistics stage, with the real column schema, for a 16-layer x 8-head
registry (128 heads in 7 blocks, UNet-style names) and 2,000 + 2,000 images x 10 timesteps:

- ``head_metrics``: one row per dataset x image x timestep x head (5.12 M rows; metric columns float32 to
  keep memory sane, labels as pandas strings as read from Parquet); dataset a is synthetic (masks: object
  and background probes), b has none (those columns NaN); a few heads differ between the sets, some have
  content excess;
- ``denoising``: one row per dataset x image x timestep;
- ``ablations``: the run's ``ablation_plan`` (every head, distinct layer and block, all heads, and the
  random head sets of each size: 320 of 8 heads, 120 of 16 and of 24) x zero and mean x ``ablate_n`` = 200
  images per dataset (the paper preset's) x 10 timesteps;
- role permutations: per dataset, observation shards of 256 images (null blocks of 100) x timestep x head x
  probe, each row holding R = 4,999 permutation excesses (float32; rows share a pool of draws, which changes
  no cost);
- image properties: 5 per image, the statistics of ``protocol.datasets`` (without computing them from
  pictures).

Times ``protocol.analyses.derived_tables`` end to end (the run's "statistics" stage) with each of its parts
timed inside it, then the datasets table's statistics and ``report.summary.build_summary`` (the report's
means with CIs), printing wall seconds per part, the CPU seconds of the process (on a machine shared with
other jobs the wall time exceeds them by the others' load, which the first line shows) and its peak memory.
``--scale`` s < 1 measures at s/2 and s (that fraction of the images and of ``ablate_n``) and extrapolates
each part to full size along the line through both (a fixed cost per group plus a cost per image); such
lines say "extrapolated". The last line is ``stats_scale_seconds: S``: the wall seconds of the whole stage
at full size (aim <= 60 s on 2 cores).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/stats_scale.py [--scale 1.0] [--seed 0]
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from contextlib import contextmanager

import numpy as np
import pandas as pd

from diffcircuit.instrument.registry import HeadRegistry, LayerInfo
from diffcircuit.metrics.attention import CONTENT_PROBES, HEAD_METRICS
from diffcircuit.metrics.image_stats import IMAGE_PROPERTIES
from diffcircuit.protocol import analyses
from diffcircuit.protocol.datasets import properties_table
from diffcircuit.protocol.roles import shard_slices
from diffcircuit.protocol.tasks import ablation_plan
from diffcircuit.report.summary import build_summary

FULL_N, FULL_ABLATE_N, TIMESTEPS = 2000, 200, tuple(range(50, 1000, 100))
SHARD_IMAGES, NULL_BLOCK, ROLE_PERMUTATIONS, NULL_SETS = 256, 100, 4999, 100
# 16 attention layers in 7 blocks (down 3 x 2, mid 1, up 3 x 3), 8 heads each; (layer, n_keys)
LAYERS = (
    [(f"down_blocks.{b}.attentions.{k}", 4 ** (5 - b)) for b in range(3) for k in range(2)]
    + [("mid_block.attentions.0", 16)]
    + [(f"up_blocks.{b}.attentions.{k}", 4 ** (b + 1)) for b in range(1, 4) for k in range(3)]
)
HEADS = 8
PARTS = (
    "divergence_tables",
    "complexity_table",
    "denoising_tests",
    "critical_table",
    "role_tests_table",
    "head_summary_table",
    "head_roles_table",
    "tests_table",
)


def _registry() -> HeadRegistry:
    return HeadRegistry(
        [
            LayerInfo(layer=name, heads=HEADS, head_dim=64, kind="self", n_keys=keys)
            for name, keys in LAYERS
        ]
    )


def _labels(values, repeat: int, tile: int) -> np.ndarray:
    return np.tile(np.repeat(np.asarray(values), repeat), tile)


def head_metrics(n: int, rng: np.random.Generator) -> pd.DataFrame:
    """One row per dataset x timestep x image x head, with every column ``observe_with_null`` writes."""
    h, t = len(LAYERS) * HEADS, len(TIMESTEPS)
    frames = []
    for d, dataset in enumerate("ab"):
        rows = t * n * h
        layer = _labels(np.repeat([name for name, _ in LAYERS], HEADS), 1, t * n)
        keys = _labels(np.repeat([k for _, k in LAYERS], HEADS), 1, t * n).astype(np.int64)
        shift = np.where(
            np.arange(h) % 16 == 0, 0.3 * d, 0.0
        )  # every 16th head differs between the sets
        base = np.log(keys) * (0.7 + 0.2 * np.tile(np.arange(h) / h, t * n)).astype(np.float32)
        entropy = (base + np.tile(shift, t * n) + rng.normal(0, 0.2, rows)).astype(np.float32)
        frame = {
            "dataset": np.full(rows, dataset),
            "image": _labels(np.arange(n, dtype=np.int64), h, t),
            "timestep": _labels(np.asarray(TIMESTEPS, np.int64), n * h, 1),
            "layer": layer,
            "head": np.tile(np.arange(HEADS, dtype=np.int64), t * n * len(LAYERS)),
            "n_keys": keys,
            "entropy_nats": entropy,
            "entropy_norm": (entropy / np.log(keys)).astype(np.float32),
        }
        frame |= {m: rng.normal(1, 0.1, rows).astype(np.float32) for m in HEAD_METRICS}
        frame |= {
            "eps_mse": np.repeat(rng.uniform(0.1, 1, t * n).astype(np.float32), h),
            "x0_mse": np.repeat(rng.uniform(0.1, 1, t * n).astype(np.float32), h),
        }
        for probe in CONTENT_PROBES:
            masked = (
                probe in ("object", "background") and dataset == "b"
            )  # no masks on the natural set
            excess = np.tile(np.where(np.arange(h) % 8 == 1, 0.2, 0.0), t * n) + rng.normal(
                0, 0.3, rows
            )
            frame[f"{probe}_log"] = (
                np.full(rows, np.nan, np.float32)
                if masked
                else rng.normal(0, 0.3, rows).astype(np.float32)
            )
            frame[f"{probe}_excess"] = (
                np.full(rows, np.nan, np.float32) if masked else excess.astype(np.float32)
            )
        if dataset == "b":
            frame["object_affinity"][:] = np.nan
            frame["background_affinity"][:] = np.nan
        frames.append(pd.DataFrame(frame))
    return pd.concat(frames, ignore_index=True)


def denoising(n: int, rng: np.random.Generator) -> pd.DataFrame:
    rows = 2 * len(TIMESTEPS) * n
    eps = rng.uniform(0.1, 1, rows)
    return pd.DataFrame(
        {
            "dataset": np.repeat(["a", "b"], rows // 2),
            "image": _labels(np.arange(n), 1, 2 * len(TIMESTEPS)),
            "timestep": _labels(TIMESTEPS, n, 2),
            "eps_mse": eps,
            "x0_mse": rng.uniform(0.1, 1, rows),
            "eps_mse_trivial": eps * rng.uniform(0.9, 1.4, rows),
            "x0_mse_trivial": rng.uniform(0.1, 1, rows),
        }
    )


def ablations(n: int, rng: np.random.Generator) -> pd.DataFrame:
    """The run's ablation plan x zero and mean x datasets x timesteps x ``n`` images (``interventions.sweep``'s columns)."""
    plan, aliases = ablation_plan(_registry(), null_sets=NULL_SETS, seed=0)
    methods, t = ("zero", "mean"), len(TIMESTEPS)
    per = len(plan) * len(methods) * n  # rows per dataset x timestep: targets x methods x images
    rows = 2 * t * per
    target = _labels([p.name for p in plan], len(methods) * n, 2 * t)
    size = _labels([len(p.heads) for p in plan], len(methods) * n, 2 * t)
    clean = rng.uniform(0.1, 1, rows)
    degradation = size * rng.gamma(1.0, 0.5, rows) + np.where(
        np.char.endswith(target.astype(str), ":3"), 5.0, 0.0
    )
    first = [p.heads[0] for p in plan]
    frame = pd.DataFrame(
        {
            "dataset": np.repeat(["a", "b"], rows // 2),
            "timestep": _labels(TIMESTEPS, per, 2),
            "image": np.tile(np.arange(n), rows // n),
            "level": _labels([p.level for p in plan], len(methods) * n, 2 * t),
            "target": target,
            "n_heads": size,
            "layer": _labels(
                [a.layer if p.level == "head" else None for p, a in zip(plan, first)],
                len(methods) * n,
                2 * t,
            ),
            "head": _labels(
                [a.head if p.level == "head" else None for p, a in zip(plan, first)],
                len(methods) * n,
                2 * t,
            ),
            "method": _labels(np.repeat(methods, n), 1, 2 * t * len(plan)),
            "mse_clean": clean,
            "mse_intervened": clean * (1 + degradation / 100),
            "degradation_pct": degradation,
            "x0_mse_clean": clean,
            "x0_mse_intervened": clean * (1 + degradation / 50),
        }
    )
    frame["head"] = frame["head"].astype("Int64")
    frame["x0_psnr_clean"] = -10 * np.log10(frame.x0_mse_clean)
    frame["x0_psnr_intervened"] = -10 * np.log10(frame.x0_mse_intervened)
    frame["also_named"] = frame.target.map(lambda name: ",".join(aliases.get(name, ())))
    return frame


def role_permutations(n: int, rng: np.random.Generator) -> dict[str, pd.DataFrame]:
    """Per dataset, ``protocol.roles.permutation_table`` rows of every observation shard, concatenated."""
    pool = rng.normal(-1, 1, (512, ROLE_PERMUTATIONS)).astype(
        np.float32
    )  # rows share draws: memory, not cost
    out = {}
    for dataset in "ab":
        probes = (
            CONTENT_PROBES
            if dataset == "a"
            else tuple(p for p in CONTENT_PROBES if p not in ("object", "background"))
        )
        rows = []
        for lo, hi in shard_slices(n, SHARD_IMAGES, NULL_BLOCK):
            for t in TIMESTEPS:
                for layer, _ in LAYERS:
                    for probe in probes:
                        rows += [
                            {
                                "timestep": t,
                                "layer": layer,
                                "head": h,
                                "probe": probe,
                                "observed": 0.0,
                                "scale": 1.0,
                                "n_images": hi - lo,
                                "n_permutations": ROLE_PERMUTATIONS,
                                "excess": pool[rng.integers(len(pool))],
                            }
                            for h in range(HEADS)
                        ]
        out[dataset] = pd.DataFrame(rows)
    return out


@contextmanager
def timed(module, names):
    """Replace ``module.<name>`` by a timed wrapper for each name (restored after); yields {name: seconds}."""
    spent, originals = {}, {name: getattr(module, name) for name in names}

    def wrap(name, fn):
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - start

        return run

    try:
        for name, fn in originals.items():
            setattr(module, name, wrap(name, fn))
        yield spent
    finally:
        for name, fn in originals.items():
            setattr(module, name, fn)


def _manifest(n: int) -> dict:
    return {
        "model": "synthetic 16x8 registry",
        "config": {
            "seed": 0,
            "correction": "fdr_bh",
            "timesteps": list(TIMESTEPS),
            "mean_reference": "heldout",
            "null_sets": NULL_SETS,
        },
        "datasets": {"a": {"spec": "synthetic", "n": n}, "b": {"spec": "data/celeba", "n": n}},
    }


def measure(scale: float, seed: int) -> dict[str, float]:
    """Seconds per part of the statistics stage on tables of ``scale`` x the full size."""
    n, n_ablate = max(8, round(FULL_N * scale)), max(4, round(FULL_ABLATE_N * scale))
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    heads, images, ablated = head_metrics(n, rng), denoising(n, rng), ablations(n_ablate, rng)
    perms = role_permutations(n, rng)
    props = {
        d: {p: rng.normal(0.3 + 0.05 * (d == "b"), 0.1, n) for p in IMAGE_PROPERTIES} for d in "ab"
    }
    print(
        f"tables: head_metrics {len(heads):,} rows, denoising {len(images):,}, ablations {len(ablated):,} "
        f"(ablate_n {n_ablate}), role permutation rows {sum(len(p) for p in perms.values()):,} x {ROLE_PERMUTATIONS}; "
        f"{n} images per set, {len(TIMESTEPS)} timesteps; built in {time.perf_counter() - start:.1f} s"
    )
    cpu = time.process_time()
    with timed(analyses, PARTS) as spent:
        start = time.perf_counter()
        tables = analyses.derived_tables(
            heads, ablated, seed=seed, role_permutations=perms, denoising=images
        )
        spent[STAGE] = time.perf_counter() - start
    start = time.perf_counter()
    properties_table(props, seed=seed)
    spent[DATASETS] = time.perf_counter() - start
    start = time.perf_counter()
    build_summary(
        manifest=_manifest(n),
        heads=heads,
        images=images,
        roles=tables["head_roles"],
        divergence=tables["divergence"],
        ablations=ablated,
        complexity=tables["complexity"],
        tests=tables["tests"],
        critical=tables["critical"],
        divergence_heads=tables["divergence_heads"],
    )
    spent[SUMMARY] = time.perf_counter() - start
    spent[CPU] = time.process_time() - cpu
    return spent


STAGE, DATASETS, SUMMARY = (
    "derived_tables (end to end)",
    "datasets (properties_table)",
    "report summary (build_summary)",
)
CPU = "CPU seconds of this process, all three (wall time above it on a busy machine: others' load)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="fraction of the 2,000 images (and 200 ablated) per set",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    names = (*PARTS, STAGE, DATASETS, SUMMARY, CPU)
    print(
        f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; OMP_NUM_THREADS="
        f"{os.environ.get('OMP_NUM_THREADS', 'unset')}"
    )
    if args.scale >= 1:
        spent = measure(1.0, args.seed)
        for name in names:
            print(f"{name}: {spent.get(name, 0.0):.2f} s")
        print(f"peak memory: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB")
        print(f"stats_scale_seconds: {spent[STAGE] + spent[DATASETS] + spent[SUMMARY]:.1f}")
        return
    low, high = measure(args.scale / 2, args.seed), measure(args.scale, args.seed)
    full = {}
    for name in names:  # a line through both scales: fixed cost per group + cost per image
        slope = (high.get(name, 0.0) - low.get(name, 0.0)) / (args.scale / 2)
        full[name] = max(high.get(name, 0.0), high.get(name, 0.0) + slope * (1 - args.scale))
        print(
            f"{name}: {low.get(name, 0.0):.2f} s at --scale {args.scale / 2:g}, {high.get(name, 0.0):.2f} s at "
            f"{args.scale:g}; extrapolated to full size: {full[name]:.1f} s"
        )
    total = full[STAGE] + full[DATASETS] + full[SUMMARY]
    print(
        f"stats_scale_seconds: {total:.1f} (extrapolated, linear in images through --scale {args.scale / 2:g} "
        f"and {args.scale:g})"
    )


if __name__ == "__main__":
    main()
