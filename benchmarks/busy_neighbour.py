"""The embedded model's forward beside a busy neighbour, with OpenMP's spinning and passive waiting.

Two identical processes run the same loop of 16-image forwards at once (each with one thread per core,
torch's default), first with libgomp's default wait policy (idle threads spin), then with
``OMP_WAIT_POLICY=PASSIVE`` (what diffcircuit sets unless told otherwise; see ``diffcircuit._threads``), and
one process alone for reference. Lines: milliseconds per forward for each case, then
``neighbour_slowdown_spin: X`` and ``neighbour_slowdown_passive: X`` (each ÷ alone; sharing the cores
fairly costs about 2).

    .venv/bin/python benchmarks/busy_neighbour.py [--forwards 40]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

_LOOP = """
import time, torch
from diffcircuit.models.loading import load_denoiser
net = load_denoiser().network
x, t = torch.randn(16, 3, 32, 32), torch.full((16,), 500)
with torch.no_grad():
    net(x, t)
    start = time.perf_counter()
    for _ in range({n}):
        net(x, t)
print(1000 * (time.perf_counter() - start) / {n})
"""


def _run(policy: str | None, copies: int, forwards: int) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    code = _LOOP.format(n=forwards)
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    else:  # libgomp's default: import torch before diffcircuit can ask for passive waiting
        code = "import torch\n" + code
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(copies)
    ]
    times = [float(p.communicate()[0].strip()) for p in procs]
    return max(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--forwards", type=int, default=40)
    args = parser.parse_args()
    alone = _run("PASSIVE", 1, args.forwards)
    spin = _run(None, 2, args.forwards)
    passive = _run("PASSIVE", 2, args.forwards)
    print(f"cores: {os.cpu_count()}  forwards per process: {args.forwards}")
    print(
        f"alone: {alone:.0f} ms   two processes, spinning: {spin:.0f} ms   two processes, passive: {passive:.0f} ms"
    )
    print(f"neighbour_slowdown_spin: {spin / alone:.2f}")
    print(f"neighbour_slowdown_passive: {passive / alone:.2f}")


if __name__ == "__main__":
    main()
