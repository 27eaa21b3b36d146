"""Many searches over circuit losses in lockstep: each round, every search's next head sets in shared forwards.

A *job* is any function of a loss (``prune_circuit``, ``necessary_heads``, ``circuit_curve``,
``gap_test``, a composition of them) paired with the loss it runs on (a ``CircuitLoss`` or a
``ResampledLoss``). ``lockstep`` runs every job to its end by replay: each round it calls each
unfinished job afresh on a view of its loss that answers from the cache and, at the first head set
(or ``prefetch`` group) not yet evaluated, notes it and stops that job. The noted sets of all jobs are
then evaluated together (``evaluate_sets``: distinct sets once, on the union of the images asked for,
stacked up to ``stack_rows`` rows a forward), and the next round replays again, now further.

A job's calls are those of the same function run alone on the loss, in the same order, answered with
the same cached values, so it returns what that run returns (the searches are deterministic given the
losses): lockstep changes how many forwards the losses cost, never a result. Rounds are as many as
the longest job's sequence of dependent evaluations; replaying costs a job its own bookkeeping again
(cache look-ups), not forwards.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from diffcircuit.discovery.loss import CircuitLoss, ResampledLoss, evaluate_sets

__all__ = ["lockstep"]


class _Pending(Exception):
    """A job reached head sets that are not evaluated yet."""


class _Replay:
    """A loss view for one round of one job: cached values only; the first missing set(s) stop the job."""

    def __init__(self, view: CircuitLoss | ResampledLoss, lookahead: int = 1):
        self.view, self.lookahead = (
            view,
            lookahead,
        )  # how far ahead a search may ask this round (``prune_heads``)
        self.need: list[frozenset] = []

    def __getattr__(self, name: str):  # heads, method, metric, registry, n_images: the loss's own
        return getattr(self.view, name)

    def _ready(self, sets) -> None:
        if not hasattr(
            self.view, "known"
        ):  # a plain loss (a function of the head set): computed when called
            return
        missing = [frozenset(s) for s in sets if not self.view.known(s)]
        if missing:
            self.need = missing
            raise _Pending

    def prefetch(self, sets) -> None:
        self._ready(list(sets))

    def per_image(self, ablated) -> np.ndarray:
        self._ready([ablated])
        return self.view.per_image(ablated)

    def __call__(self, ablated) -> float:
        self._ready([ablated])
        return self.view(ablated)


def _request(view, key: frozenset):
    if isinstance(view, ResampledLoss):
        return view.base, key, view.images
    return view, key, np.arange(view.n_images)


def _rows(requests) -> set:
    """The (loss, set, timestep, image) rows the requests need that are not evaluated yet."""
    return {
        (id(base), key, i, k)
        for base, key, images in requests
        for i, k in base.missing(key, images)
    }


def _fit(needs: dict[int, list], budget: int) -> tuple[list[int], list[int], set, int]:
    """``(run, deferred, rows, capacity)``: the jobs whose requests run this round, in priority order, as many as
    fill the round's whole forwards (at least one forward, and always the first job), the others waiting for the
    next round; the rows they need and the rows those forwards hold."""
    rows = {j: _rows(requests) for j, requests in needs.items()}
    capacity = budget * max(1, len(set().union(*rows.values())) // budget)
    run, deferred, used = [], [], set()
    for j, new in rows.items():
        if not run or len(used) + len(new - used) <= capacity:
            run.append(j)
            used |= new
        else:
            deferred.append(j)
    return run, deferred, used, capacity


def _needs(jobs, active: list[int], results: list, lookahead: int) -> dict[int, list]:
    """Replay each active job; finished jobs' results are stored, the others' next requests returned."""
    needs = {}
    for j in active:
        fn, view = jobs[j]
        replay = _Replay(view, lookahead)
        try:
            results[j] = fn(replay)
        except _Pending:
            needs[j] = [_request(view, key) for key in replay.need]
    return needs


def lockstep(
    jobs: Sequence[tuple[Callable, CircuitLoss | ResampledLoss]],
    *,
    lookahead: int = 1,
    on_round: Callable[[int], None] | None = None,
) -> list:
    """``[fn(view) for fn, view in jobs]``, with the head sets every unfinished job needs next evaluated together
    each round. A round runs whole forwards (``stack_rows`` rows each): the jobs whose requests would spill into a
    last, partly filled forward wait for the next round, ahead of the others. ``lookahead`` > 1: rows the round's
    forwards hold beyond what it needs go to the searches' predicted next evaluations (``prune_heads``), up to
    ``lookahead`` ahead: fewer rounds, more rows, never more forwards. ``on_round(n_sets)`` is told each round's
    number of requested sets (for cost reports)."""
    results: list = [None] * len(jobs)
    active = list(range(len(jobs)))  # in priority order
    while active:
        needs = _needs(jobs, active, results, 1)
        if not needs:
            break
        budget = min(base.stack_rows for requests in needs.values() for base, _, _ in requests)
        run, deferred, used, capacity = _fit(needs, budget)
        if (
            lookahead > 1 and len(used) < capacity
        ):  # the slack of the last forward: speculate into it
            for j, requests in _needs(jobs, run, results, lookahead).items():
                new = _rows(requests) - used
                if len(used) + len(new) <= capacity:
                    needs[j], used = requests, used | new
        requests = [r for j in run for r in needs[j]]
        if on_round is not None:
            on_round(len(requests))
        evaluate_sets(requests)
        active = deferred + run
    return results
