"""CPU threads: how many, and how idle ones wait, so that a run shares a machine without collapsing.

torch's CPU kernels run on OpenMP threads (libgomp). By default an idle OpenMP thread *spins* for a
while before sleeping; two processes that each keep one thread per core then take turns spinning
on each other's cores, and both slow down several-fold (measured on 2 cores: a 16-image forward of
the embedded model 0.17–0.35 s alone, 1.3–1.5 s each with a second such process beside it; with
passive waiting 0.5 s each, what sharing two cores costs). diffcircuit therefore asks for passive
waiting (``OMP_WAIT_POLICY=PASSIVE``) unless the environment already says otherwise. libgomp reads
the variable once, when torch is first imported, so this works when diffcircuit is imported before
torch (the CLI always is); in a notebook that imported torch first, export it before starting.
``benchmarks/busy_neighbour.py`` measures both policies beside a busy neighbour.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["prefer_passive_wait", "set_threads", "threads_restored"]


def prefer_passive_wait() -> None:
    """Idle OpenMP threads sleep instead of spinning (unless ``OMP_WAIT_POLICY`` is already set)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def set_threads(threads: int | None) -> None:
    """Intra-op CPU threads for this process (None or 0: torch's default, one per core)."""
    if threads:
        import torch

        torch.set_num_threads(int(threads))


@contextmanager
def threads_restored() -> Iterator[None]:
    """Whatever sets the thread count inside, the process's count is what it was afterwards (a command run
    in-process, e.g. from a notebook or a test, leaves no global state behind)."""
    import torch

    before = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(before)
