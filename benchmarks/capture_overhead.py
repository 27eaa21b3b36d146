"""Cost of capturing every head statistic, relative to the plain forward pass.

Times, in one run, the embedded model's forward on a batch of 64 synthetic images at t = 500:
the default diffusers processors, the fused capture (entropy, perplexity and all probe moments on
every head, probe maps included), and the naive reference capture; and the probe maps alone (their
share of the capture). Medians of repeated runs, in three interleaved rounds (their ratios show the
machine's noise). The last line is ``capture_overhead_ratio: <fused / plain>``.

On a GPU (``--device cuda``) every timed call ends with a synchronisation; ``--precision bf16`` (or fp16)
runs plain and captured forwards alike under autocast, so the fused kernel runs in that precision too
(``instrument.capture.kernel_dtype``): the ratio is capture's cost in the precision a GPU user would run.

    .venv/bin/python benchmarks/capture_overhead.py [--batch 64] [--repeats 15] [--device cuda] [--precision bf16]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics

import numpy as np
import torch
from _timing import median_seconds  # benchmarks/_timing.py (the script's folder is on sys.path)

import diffcircuit  # noqa: F401  first: it sets idle OpenMP threads to wait passively before torch starts them
from diffcircuit import instrument, load_denoiser, load_images, probe_registry
from diffcircuit.metrics.probes import ProbeFeatures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    args = parser.parse_args()
    device = torch.device(args.device)
    den = load_denoiser(device=args.device)
    net = den.network
    data = load_images("synthetic", n=args.batch, size=den.sample_size, channels=den.in_channels)
    x0 = torch.from_numpy(np.asarray(data.images)).to(device)
    masks = torch.from_numpy(np.asarray(data.masks)).to(device)
    t = torch.full((args.batch,), 500, device=device)
    x_t = den.scheduler.add_noise(x0, torch.randn_like(x0), t)
    registry = probe_registry(net, x_t[:1], t[:1])
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)

    def timed(fn):  # under the precision asked for; the GPU's queue drained before the clock stops
        @torch.no_grad()
        def run():
            with torch.autocast(device.type, dtype=low) if low else contextlib.nullcontext():
                fn()
            if device.type == "cuda":
                torch.cuda.synchronize()

        return run

    plain = timed(lambda: net(x_t, t))

    def capture(method):
        def run():
            with instrument(
                net,
                registry=registry,
                capture=True,
                method=method,
                key_features=ProbeFeatures(x0, masks),
            ) as session:
                net(x_t, t)
            for stat in ("entropy_nats", "perplexity", "moments"):
                session.pop(stat)

        return timed(run)

    grids = sorted({info.query_grid for info in registry.layers if info.query_grid})

    def maps():  # the probe maps alone (metrics.probes): part of the fused capture's time, not attention's
        features = ProbeFeatures(x0, masks)
        for grid in grids:
            features(grid)

    # interleave the variants so drifts in machine load hit all of them alike
    rounds = {"plain": [], "fused": [], "naive": [], "maps": []}
    fns = {
        "plain": plain,
        "fused": capture("fused"),
        "naive": capture("naive"),
        "maps": timed(maps),
    }
    for _ in range(3):
        for name, fn in fns.items():
            rounds[name].append(median_seconds(fn, max(1, args.repeats // 3)))
    t_plain, t_fused, t_naive, t_maps = (
        statistics.median(rounds[k]) for k in ("plain", "fused", "naive", "maps")
    )
    print(
        f"device: {device}  precision: {args.precision}  threads: {torch.get_num_threads()}  "
        f"batch: {args.batch}  heads: {len(registry)}"
    )
    print(f"plain forward:         {t_plain * 1000:8.1f} ms")
    print(f"fused capture forward: {t_fused * 1000:8.1f} ms")
    print(
        f"  of which probe maps: {t_maps * 1000:8.1f} ms  ({t_maps / t_plain:.3f} of the plain forward)"
    )
    print(f"naive capture forward: {t_naive * 1000:8.1f} ms")
    spread = [fused / plain for fused, plain in zip(rounds["fused"], rounds["plain"])]
    print(
        "capture overhead per round: " + " ".join(f"{r:.3f}" for r in spread)
    )  # machine-load noise
    print(f"naive_overhead_ratio: {t_naive / t_plain:.3f}")
    print(f"capture_overhead_ratio: {t_fused / t_plain:.3f}")


if __name__ == "__main__":
    main()
