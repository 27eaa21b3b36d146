"""Peak memory of the capture stage at 10x the images: does it stream, or hold everything?

Runs the run's observation stage (``diffcircuit run``'s own code path: ``protocol.tasks.observe_tasks``
computed by the local backend into a shard store, every head's statistics on every image) on the
embedded model, synthetic images for both datasets, once with N = 400 and once with N = 4,000 images
per dataset, each in a fresh process, and reads each process's peak resident set size
(``ru_maxrss``). The last line is ``rss_ratio: <peak RSS at 4,000 / at 400>`` (bar 1.25, aim 1.10).

    .venv/bin/python benchmarks/memory_scaling.py [--small 400] [--large 4000] [--timesteps 500]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time


def _child(n: int, timesteps: str, out: str) -> None:
    """One measurement: the observation stage on ``n`` images per dataset, then the peak RSS as JSON."""
    import resource

    from diffcircuit.protocol.backends import LocalBackend
    from diffcircuit.protocol.config import RunConfig, parse_timesteps
    from diffcircuit.protocol.store import Shards
    from diffcircuit.protocol.tasks import Context, observe_tasks

    start = time.perf_counter()
    cfg = RunConfig(
        data_a="synthetic",
        data_b="synthetic",
        n=n,
        timesteps=parse_timesteps(timesteps),
        device="cpu",
    )
    ctx = Context.build(cfg)
    shards = Shards(out)
    tasks = observe_tasks(ctx, seed=cfg.seed)
    LocalBackend(ctx).run(tasks, shards, lambda task, k: None)
    rows = sum(len(shards.read(t.name, ["images.parquet"])["images.parquet"]) for t in tasks)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print(
        json.dumps(
            {
                "n": n,
                "shards": len(tasks),
                "image_rows": rows,
                "peak_rss_mib": peak_mib,
                "seconds": time.perf_counter() - start,
            }
        )
    )


def _measure(n: int, timesteps: str) -> dict:
    with tempfile.TemporaryDirectory() as out:
        done = subprocess.run(
            [sys.executable, __file__, "--child", str(n), "--timesteps", timesteps, "--out", out],
            capture_output=True,
            text=True,
            check=True,
        )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=400)
    parser.add_argument("--large", type=int, default=4000)
    parser.add_argument("--timesteps", default="500")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        _child(args.child, args.timesteps, args.out)
        return
    small, large = _measure(args.small, args.timesteps), _measure(args.large, args.timesteps)
    for r in (small, large):
        print(
            f"N = {r['n']:5d} images per dataset: {r['shards']} shards, {r['image_rows']} image rows, "
            f"peak RSS {r['peak_rss_mib']:.0f} MiB, {r['seconds']:.0f} s"
        )
    print(f"rss_ratio: {large['peak_rss_mib'] / small['peak_rss_mib']:.3f}")


if __name__ == "__main__":
    main()
