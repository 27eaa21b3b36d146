"""The default run's wall time as a multiple of one plain forward of 64 images, on this machine.

Machines differ, so the figure is a ratio: a plain (uninstrumented) forward of 64 images of the embedded
model is timed before and after (median of 5 each, after warm-ups), and ``diffcircuit run`` with the
default configuration (plus any arguments given after ``--``) runs in between, into a fresh directory.
It prints the run's cost per stage from its manifest, then ``default_run_seconds: S``,
``forward64_seconds: F`` and ``default_run_forwards: <S / F>``.

    .venv/bin/python benchmarks/default_run.py [--out /tmp/default_run] [-- --threads 2 ...]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

from diffcircuit.cli import main as cli
from diffcircuit.models.loading import load_denoiser


def forward64_seconds(repeats: int = 5) -> float:
    net = load_denoiser().network
    x, t = (
        torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(0)),
        torch.full((64,), 500),
    )
    times = []
    with torch.no_grad():
        net(x, t)
        net(x, t)
        for _ in range(repeats):
            start = time.perf_counter()
            net(x, t)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/diffcircuit_default_run")
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    before = forward64_seconds()
    start = time.perf_counter()
    code = cli(["run", "--out", str(out), "--quiet", *extra])
    seconds = time.perf_counter() - start
    after = forward64_seconds()
    if code != 0:
        raise SystemExit(f"the run failed (exit {code})")
    forward = statistics.mean([before, after])
    for label, cost in json.loads((out / "manifest.json").read_text())["cost"].items():
        print(
            f"{label}: {cost['forward_calls']} forward calls, {cost['image_forwards']} image forwards, "
            f"{cost['seconds']:.1f} s"
        )
    print(
        f"threads: {torch.get_num_threads()}  forward64 before/after: {before:.3f} / {after:.3f} s"
    )
    print(f"default_run_seconds: {seconds:.1f}")
    print(f"forward64_seconds: {forward:.3f}")
    print(f"default_run_forwards: {seconds / forward:.0f}")


if __name__ == "__main__":
    main()
