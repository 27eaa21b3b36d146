"""Minimal circuits: the smallest set of heads that carries the model's denoising.

Loss L(S) is a per-image loss averaged over the given images and the timesteps of a window, with
every head in S ablated (mean ablation by default: each removed head's output slice is replaced by
its mean over the same images at the same position and timestep). Two losses (``metric``):

- ``"eps"``: the ε-MSE against the true noise (how well the ablated model still denoises);
- ``"output"``: ACDC's criterion, the mean squared distance of the ablated model's ε̂ to the *full*
  model's ε̂ on the same inputs (how far the ablation moves the output; L_full = 0 exactly).

With all heads H: L_full = L(∅), L_empty = L(H), the gap = L_empty − L_full (what ablating every
head costs), L_circuit = L(H \\ C) (everything outside the circuit C ablated), and

- faithfulness = (L_empty − L_circuit) / gap: the share of the gap the circuit alone recovers;
- recovered_without_circuit = (L_empty − L(C)) / gap with only the circuit ablated: the share the
  rest of the model recovers without it (near 0 when the circuit carries everything, near 1 when the
  heads outside it can stand in for it).

τ is a fraction of the gap: a circuit C passes when L_circuit − L_full ≤ τ · gap, i.e. when its
faithfulness is at least 1 − τ. When the gap is not positive there is nothing to recover and no
circuit to find; :func:`gap_test` tests the gap over images (one-sided sign-flip permutation test
of the per-image gaps), and callers claim no circuit where it is not significantly positive.

``prune_circuit`` is ACDC-style: starting from the full model it removes heads in increasing order
of importance, keeping a removal while the circuit passes τ. ``grow_circuit`` is the greedy
forward variant: starting from the empty circuit it adds heads in decreasing order of importance
until the circuit passes τ.

``prune_circuit`` tests removals in groups by default: it tries to remove a run of consecutive
heads (in importance order) at once, doubling the run after a success and halving it (from the
same head) after a failure; only a single head's failure keeps that head. Whatever the loss, the
result passes τ (every accepted removal set passed), but it equals the one-at-a-time search's
(``search="sequential"``) only where the loss is monotone (removing more heads never lowers it):
where removing a group lowers the loss below what removing its first member alone costs, a group
can pass where the one-at-a-time search would have kept that member (tested), so the grouped
circuit can be smaller. Where the loss is monotone it keeps exactly the same heads, with fewer
evaluations (low-importance heads pass in large groups).

Minimality: a head of a circuit is *individually necessary* when ablating it, on top of
everything outside the circuit, breaks τ (:func:`necessary_heads`). Two heads that duplicate each
other are both kept only if each alone is unnecessary; a pruned circuit keeps one of them.

``circuit_curve`` gives faithfulness and recovered_without_circuit of the top-k heads (by
importance) for a range of k: how much of the gap the k most important heads carry.

Cost: every function here is a plain function of a loss (any callable of a head set). With a
``CircuitLoss`` (``discovery.loss``) evaluations are memoised per head set and image and several
sets run stacked in one forward: the functions tell the loss which sets come next (``prefetch``:
the curve's sets, the necessity checks, a circuit's two losses), and ``discovery.lockstep`` replays
many of them so that their next sets share forwards. ``prune_heads`` may also ask ahead for the
evaluations the single-head effects predict it will need (``lookahead``): that changes the number
of rounds and evaluations, never the result (the search decides on evaluated losses only; tested).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np

from diffcircuit.discovery.loss import METRICS, CircuitLoss, ResampledLoss
from diffcircuit.errors import ConfigError
from diffcircuit.instrument.registry import HeadAddress

__all__ = [
    "GAP_ALPHA",
    "METRICS",
    "Circuit",
    "CircuitLoss",
    "GapTest",
    "OutOfBag",
    "ResampledLoss",
    "circuit_curve",
    "curve_sizes",
    "gap_test",
    "grow_circuit",
    "jaccard",
    "necessary_heads",
    "out_of_bag_faithfulness",
    "out_of_bag_requests",
    "passes_tau",
    "prune_circuit",
    "prune_heads",
    "ranking_auc",
]

GAP_ALPHA = (
    0.05  # one-sided level of the gap test (Benjamini–Hochberg over a run's dataset x window tests)
)


@dataclass(frozen=True, kw_only=True)
class GapTest:
    """Is ablating every head worse than ablating none? One-sided, over images (the unit)."""

    mean: float  # mean per-image gap L_empty − L_full
    ci_low: float  # 95 % percentile bootstrap interval of the mean over images
    ci_high: float
    relative: (
        float | None
    )  # mean gap / mean L_full (None when L_full is 0, as for the output metric)
    p_value: (
        float  # H0: the per-image gaps are symmetric about 0 (sign-flip permutation), H1: mean > 0
    )
    p_floor: float  # the smallest p this test can give at this n
    effect_size: float  # Cohen's d_z of the per-image gaps
    n_images: int
    alpha: float
    test: str = "one-sided paired sign-flip permutation test of the per-image gap L_empty − L_full"
    p_corrected: float | None = (
        None  # p corrected over the family of gap tests (None: a lone test, uncorrected)
    )
    family_size: int = 1  # how many gap tests that correction covers (datasets x windows)
    correction: str = "none"

    @property
    def significant(self) -> bool:
        return (self.p_value if self.p_corrected is None else self.p_corrected) < self.alpha

    @property
    def q_floor(self) -> float:
        """The corrected p of a lone positive gap at the floor (the first BH / Holm step: m · p_floor)."""
        return min(1.0, self.family_size * self.p_floor)

    def corrected(self, p_corrected: float, family_size: int, correction: str) -> GapTest:
        return replace(
            self,
            p_corrected=float(p_corrected),
            family_size=int(family_size),
            correction=correction,
        )

    def to_dict(self) -> dict:
        return {
            k: (None if isinstance(v, float) and v != v else v) for k, v in asdict(self).items()
        } | {"significant": self.significant, "q_floor": self.q_floor}


def gap_test(
    loss: CircuitLoss, *, alpha: float = GAP_ALPHA, n_resamples: int = 9999, seed: int = 0
) -> GapTest:
    """The gap's mean with its CI and a one-sided sign-flip p-value (exact when 2^n ≤ ``n_resamples``)."""
    from scipy import stats

    from diffcircuit.stats.bootstrap import MIN_UNITS_FOR_CI, mean_ci

    _prefetch(loss, [[], loss.heads])
    full, empty = loss.per_image([]), loss.per_image(loss.heads)
    diff = empty - full  # [n_images]
    mean, low, high = mean_ci(diff, seed=seed)
    if (
        len(diff) < MIN_UNITS_FOR_CI
    ):  # a percentile interval over so few images is not a 95 % interval
        low = high = float("nan")
    if (
        len(diff) == 1
    ):  # the two sign flips, exactly (scipy's test needs two images): p = 1/2 at best
        p_value = 0.5 if diff[0] > 0 else 1.0
    else:
        p_value = stats.permutation_test(
            (diff,),
            np.mean,
            permutation_type="samples",
            alternative="greater",
            vectorized=True,
            n_resamples=n_resamples,
            random_state=np.random.default_rng(seed),
        ).pvalue
    exact = len(diff) <= 62 and 2 ** len(diff) <= n_resamples
    sd = diff.std(ddof=1) if len(diff) > 1 else 0.0
    return GapTest(
        mean=mean,
        ci_low=low,
        ci_high=high,
        relative=float(mean / full.mean()) if full.mean() > 0 else None,
        p_value=float(p_value),
        p_floor=2.0 ** -len(diff) if exact else 1.0 / (n_resamples + 1),
        effect_size=float(diff.mean() / sd) if sd > 0 else float("nan"),
        n_images=len(diff),
        alpha=alpha,
    )


@dataclass(frozen=True, kw_only=True)
class Circuit:
    heads: tuple[HeadAddress, ...]
    tau: float  # a fraction of the gap L_empty − L_full
    method: str
    metric: str
    loss_full: float
    loss_empty: float
    loss_circuit: float  # everything outside the circuit ablated
    loss_without_circuit: float  # only the circuit ablated
    necessary: tuple[HeadAddress, ...] | None = (
        None  # individually necessary heads (None: not computed)
    )

    @property
    def gap(self) -> float:
        return self.loss_empty - self.loss_full

    def _recovered(self, loss: float) -> float:
        return (
            (self.loss_empty - loss) / self.gap
            if self.gap > 1e-9 * abs(self.loss_empty)
            else float("nan")
        )

    @property
    def faithfulness(self) -> float:
        """NaN when ablating every head does not raise the loss (nothing to recover)."""
        return self._recovered(self.loss_circuit)

    @property
    def recovered_without_circuit(self) -> float:
        return self._recovered(self.loss_without_circuit)


def _prefetch(loss, sets) -> None:
    """Tell a loss that can stack evaluations (``CircuitLoss``, ``ResampledLoss``, a lockstep view) which head sets
    come next, so that it evaluates them together; a plain callable is just called later."""
    prefetch = getattr(loss, "prefetch", None)
    if prefetch is not None:
        prefetch([list(s) for s in sets])


def passes_tau(value: float, full: float, empty: float, tau: float) -> bool:
    """L − L_full ≤ τ · (L_empty − L_full): the loss is within τ of the gap from the full model."""
    return value - full <= tau * (empty - full)


def _circuit(loss, kept: Sequence[HeadAddress], tau: float, full: float, empty: float) -> Circuit:
    outside = [a for a in loss.heads if a not in kept]
    _prefetch(loss, [outside, kept])
    return Circuit(
        heads=tuple(sorted(kept)),
        tau=tau,
        method=loss.method,
        metric=getattr(loss, "metric", "eps"),
        loss_full=full,
        loss_empty=empty,
        loss_circuit=loss(outside),
        loss_without_circuit=loss(list(kept)),
    )


def necessary_heads(loss, heads: Sequence[HeadAddress], tau: float) -> tuple[HeadAddress, ...]:
    """The heads of ``heads`` whose ablation, on top of everything outside ``heads``, breaks τ."""
    outside = [a for a in loss.heads if a not in heads]
    _prefetch(loss, [[], loss.heads, *([*outside, h] for h in heads)])
    full, empty = loss([]), loss(loss.heads)
    return tuple(sorted(h for h in heads if not passes_tau(loss([*outside, h]), full, empty, tau)))


def _next_state(order: list, state: tuple, passed: bool, grouped: bool) -> tuple:
    """A pruning search's state (next head i, run size, heads removed) after its current run passed or failed.

    Galloping: a run that passes doubles the next run's length; a failure halves it, from the same head; a single
    head's failure keeps that head. One at a time: every run is one head."""
    i, size, removed = state
    if passed:
        return i + size, 2 * size if grouped else 1, removed + tuple(order[i : i + size])
    return (i + 1, 1, removed) if size == 1 else (i, size // 2, removed)


def _speculate(
    loss,
    order: list,
    state: tuple,
    *,
    full: float,
    empty: float,
    tau: float,
    grouped: bool,
    importance: dict,
    depth: int,
) -> None:
    """Prefetch the runs of the search's next ``depth`` states along the path the single-head effects predict
    (L(R ∪ run) ≈ L(R) + Σ importance/100 · L_full over the run: importance as % of the full model's loss), so
    that a lockstep round or one stacked forward evaluates them together. Only a cost: the search itself
    decides on the evaluated losses, so a wrong prediction wastes evaluations, never changes a result."""
    known = getattr(loss, "known", None)
    i, size, removed = state
    if known is None or known([*removed, *order[i : i + size]]):
        return
    value, sets = loss(list(removed)), []
    while len(sets) < depth and state[0] < len(order):
        i, size, removed = state
        run = order[i : i + size]
        sets.append([*removed, *run])
        predicted = value + sum(importance.get(a, 0.0) for a in run) / 100 * full
        passed = passes_tau(predicted, full, empty, tau)
        value = predicted if passed else value
        state = _next_state(order, state, passed, grouped)
    _prefetch(loss, sets)


def prune_heads(
    loss,
    importance: dict[HeadAddress, float],
    tau: float,
    *,
    search: str = "grouped",
    lookahead: int = 1,
) -> tuple[HeadAddress, ...]:
    """The heads ``prune_circuit`` keeps (without evaluating the circuit's own losses): all heads but those removed,
    least important first, while the removal set stays within τ of the gap; none when there is no positive gap.
    ``lookahead`` > 1: before each evaluation not yet made, the next ``lookahead`` evaluations the single-head
    effects predict are asked for together (fewer rounds and forwards, some evaluations wasted; same result)."""
    if search not in ("grouped", "sequential"):
        raise ConfigError(f"search must be 'grouped' or 'sequential', not {search!r}")
    _prefetch(loss, [[], loss.heads])
    full, empty = loss([]), loss(loss.heads)
    if empty <= full:
        return ()
    order = sorted(loss.heads, key=lambda a: (importance.get(a, 0.0), str(a)))
    grouped, state = search == "grouped", (0, 1, ())
    lookahead = max(lookahead, getattr(loss, "lookahead", 1))  # a lockstep round may allow more
    while state[0] < len(order):
        i, size, removed = state
        if lookahead > 1:
            _speculate(
                loss,
                order,
                state,
                full=full,
                empty=empty,
                tau=tau,
                grouped=grouped,
                importance=importance,
                depth=lookahead,
            )
        passed = passes_tau(loss([*removed, *order[i : i + size]]), full, empty, tau)
        state = _next_state(order, state, passed, grouped)
    return tuple(a for a in loss.heads if a not in state[2])


def prune_circuit(
    loss,
    importance: dict[HeadAddress, float],
    tau: float,
    *,
    search: str = "grouped",
    lookahead: int = 1,
) -> Circuit:
    """Remove heads, least important first, while the circuit stays within τ of the gap.

    With no positive gap (ablating every head costs nothing) the circuit is empty: nothing to recover.
    """
    kept = prune_heads(loss, importance, tau, search=search, lookahead=lookahead)
    return _circuit(loss, list(kept), tau, loss([]), loss(loss.heads))


def curve_sizes(n_heads: int) -> list[int]:
    """Circuit sizes for a curve: 0, 1, 2, 3, 4, 6, 8, 12, 16, 24, ... and all heads."""
    sizes, k = {0, n_heads}, 1
    while k < n_heads:
        sizes.update({k, min(n_heads, k + k // 2)})
        k *= 2
    return sorted(s for s in sizes if s <= n_heads)


def circuit_curve(
    loss, importance: dict[HeadAddress, float], sizes: Sequence[int] | None = None
) -> list[dict]:
    """Faithfulness and recovered_without_circuit of the top-k heads by importance, for each size k."""
    order = sorted(loss.heads, key=lambda a: (-importance.get(a, 0.0), str(a)))
    sizes = curve_sizes(len(order)) if sizes is None else sizes
    _prefetch(loss, [[], loss.heads, *(s for k in sizes for s in (order[k:], order[:k]))])
    full, empty = loss([]), loss(loss.heads)
    out = []
    for k in sizes:
        c = _circuit(loss, order[:k], float("nan"), full, empty)
        out.append(
            {
                "size": int(k),
                "loss_full": full,
                "loss_empty": empty,
                "loss_circuit": c.loss_circuit,
                "loss_without_circuit": c.loss_without_circuit,
                "faithfulness": c.faithfulness,
                "recovered_without_circuit": c.recovered_without_circuit,
            }
        )
    return out


def grow_circuit(loss, importance: dict[HeadAddress, float], tau: float) -> Circuit:
    """Add heads, most important first, until the circuit alone is within τ of the gap."""
    full, empty = loss([]), loss(loss.heads)
    kept: list[HeadAddress] = []
    for head in sorted(loss.heads, key=lambda a: (-importance.get(a, 0.0), str(a))):
        if passes_tau(loss([a for a in loss.heads if a not in kept]), full, empty, tau):
            break
        kept.append(head)
    return _circuit(loss, kept, tau, full, empty)


def ranking_auc(importance: dict[HeadAddress, float], positives: set[HeadAddress]) -> float:
    """ROC AUC of ranking heads by importance against planted labels (Mann–Whitney U / n₁n₀)."""
    from scipy.stats import mannwhitneyu

    pos = [v for a, v in importance.items() if a in positives]
    neg = [v for a, v in importance.items() if a not in positives]
    return float(mannwhitneyu(pos, neg, alternative="two-sided").statistic / (len(pos) * len(neg)))


def jaccard(a: Sequence[HeadAddress], b: Sequence[HeadAddress]) -> float:
    """|A ∩ B| / |A ∪ B|; NaN when both are empty (no circuit on either side: overlap undefined)."""
    sa, sb = set(a), set(b)
    return len(sa & sb) / len(sa | sb) if sa | sb else float("nan")


@dataclass(frozen=True, kw_only=True)
class OutOfBag:
    """Faithfulness out of sample: each bootstrap resample's circuit C_b, found on the images it drew, scored on the
    images of the pool it did not draw (O_b), so that it says how much of the gap a circuit found this way recovers
    on images it was not fitted to (in-sample it is ≥ 1 − τ by construction). Efron's leave-one-out bootstrap:
    each image is scored only by circuits that never saw it.

    Per image i: gap_i = L_i(H) − L_i(∅); recovered_i = the mean over the resamples that left i out of
    L_i(H) − L_i(H ∖ C_b). ``faithfulness`` = Σ_i recovered_i / Σ_i gap_i over the images left out at least once
    (a ratio of sums, as the in-sample faithfulness is a ratio of means; each image weighs once, however often it
    was left out). The circuits scored were found on ~63 % distinct images, so this is pessimistic for a circuit
    found on all n. ``low``/``high`` are the range of the per-resample ratios Σ_{i ∈ O_b} (L_i(H) − L_i(H ∖ C_b)) /
    Σ_{i ∈ O_b} gap_i over the resamples whose left-out gap is positive (a different statistic, shown for spread),
    and ``passing`` the share of those at ≥ 1 − τ. A resample whose search found no circuit (no positive gap on
    its draw) scores 0 and is counted in ``empty``."""

    faithfulness: float | None  # None: no image left out, or their gap is not positive
    low: float | None  # per-resample ratios: min and max
    high: float | None
    passing: float | None  # share of scored resamples whose left-out ratio is ≥ 1 − τ
    tau: float
    resamples: int  # resamples with at least one image left out
    scored: (
        int  # ... of which the left-out gap is positive (the range and ``passing`` are over these)
    )
    empty: int  # resamples whose circuit is empty
    images_scored: int  # images left out by at least one resample
    images_left_out: float  # mean images left out per resample (about 37 % of the pool)

    def to_dict(self) -> dict:
        return asdict(self)


def _left_out(pool: int, draw) -> np.ndarray:
    return np.setdiff1d(np.arange(pool), np.asarray(draw, dtype=np.int64))


def _outside(loss, kept) -> frozenset:
    """H ∖ C: every head of ``loss`` not in the circuit ``kept``."""
    inside = set(kept)
    return frozenset(a for a in loss.heads if a not in inside)


def out_of_bag_requests(
    loss: CircuitLoss, draws: Sequence, circuits: Sequence, pool: int | None = None
) -> list[tuple[CircuitLoss, frozenset, np.ndarray]]:
    """The (loss, head set, images) evaluations ``out_of_bag_faithfulness`` needs, for ``evaluate_sets`` to stack
    with other units': no head and every head ablated on the pool, and each resample's complement H ∖ C_b on the
    images it left out."""
    pool = loss.n_images if pool is None else pool
    every = np.arange(pool)
    requests = [(loss, frozenset(), every), (loss, frozenset(loss.heads), every)]
    for draw, kept in zip(draws, circuits):
        out = _left_out(pool, draw)
        if out.size:
            requests.append((loss, _outside(loss, kept), out))
    return requests


def out_of_bag_faithfulness(
    loss,
    draws: Sequence,
    circuits: Sequence[Sequence[HeadAddress]],
    tau: float,
    pool: int | None = None,
) -> OutOfBag:
    """``OutOfBag`` of the resamples ``draws`` (indices into the first ``pool`` images, default all, with repeats)
    and the circuits their searches kept. ``loss``: any loss with ``per_image(S, images)``, ``heads`` and
    ``n_images`` (a ``CircuitLoss``)."""
    pool = loss.n_images if pool is None else pool
    every = np.arange(pool)
    full, empty = loss.per_image([], every), loss.per_image(list(loss.heads), every)
    recovered, times = (
        np.zeros(pool),
        np.zeros(pool),
    )  # per image: summed recovered share, times left out
    ratios, n_out, n_empty = [], [], 0
    for draw, kept in zip(draws, circuits):
        out = _left_out(pool, draw)
        if not out.size:
            continue
        n_empty += not kept
        here = empty[out] - loss.per_image(_outside(loss, kept), out)
        recovered[out] += here
        times[out] += 1
        n_out.append(out.size)
        gap = float((empty[out] - full[out]).sum())
        if gap > 0:
            ratios.append(float(here.sum()) / gap)
    scored = times > 0
    gap_sum = float((empty - full)[scored].sum())
    return OutOfBag(
        faithfulness=float((recovered[scored] / times[scored]).sum()) / gap_sum
        if scored.any() and gap_sum > 0
        else None,
        low=min(ratios) if ratios else None,
        high=max(ratios) if ratios else None,
        passing=float(np.mean([r >= 1 - tau for r in ratios])) if ratios else None,
        tau=tau,
        resamples=len(n_out),
        scored=len(ratios),
        empty=n_empty,
        images_scored=int(scored.sum()),
        images_left_out=float(np.mean(n_out)) if n_out else 0.0,
    )
