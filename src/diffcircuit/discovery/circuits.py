"""Minimal circuits: the smallest set of heads that carries the model's denoising.

Loss L(S) is the mean ε-MSE over the given images and timesteps with every head in S ablated
(mean ablation by default: each removed head's output slice is replaced by its mean over the same
images at the same position and timestep). With all heads H:

- L_full = L(∅), L_empty = L(H), L_circuit = L(H \\ C) (everything outside the circuit C ablated);
- faithfulness  = (L_empty − L_circuit) / (L_empty − L_full): loss recovered by the circuit alone;
- completeness  = (L_empty − L(C)) / (L_empty − L_full) with only the circuit ablated: near 0 when
  the circuit carries (almost) everything, near 1 when the rest of the model can stand in for it.

``prune_circuit`` is ACDC-style: starting from the full model it removes heads in increasing order
of importance, keeping a removal while (L − L_full)/L_full stays ≤ τ. ``grow_circuit`` is the
greedy forward variant: starting from the empty circuit it adds heads in decreasing order of
importance until the relative loss gap to L_full is ≤ τ.

``prune_circuit`` tests removals in groups by default: it tries to remove a run of consecutive
heads (in importance order) at once, doubling the run after a success and halving it (from the
same head) after a failure; only a single head's failure keeps that head. When removing more heads
never lowers the loss (monotone L), this keeps exactly the heads the one-at-a-time search keeps,
with fewer evaluations (low-importance heads pass in large groups); ``search="sequential"`` is the
literal one-at-a-time search.

``circuit_curve`` gives faithfulness and completeness of the top-k heads (by importance) for a
range of k: how much of the model's denoising the k most important heads carry.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from diffcircuit.instrument.registry import HeadAddress, HeadRegistry
from diffcircuit.instrument.session import instrument, probe_registry
from diffcircuit.interventions.sweep import ActivationMoments, clean_activations
from diffcircuit.metrics.observe import batch_noise
from diffcircuit.models.conditioning import images_of
from diffcircuit.models.diffusion import add_noise, eps_mse_per_image, model_device

__all__ = ["Circuit", "CircuitLoss", "circuit_curve", "curve_sizes", "grow_circuit", "jaccard", "prune_circuit",
           "ranking_auc"]


class CircuitLoss:
    """L(S): mean ε-MSE with the heads in S ablated, on fixed noisy inputs (clean statistics cached)."""

    def __init__(self, denoiser, images: np.ndarray, *, timesteps: Sequence[int], method: str = "mean", seed: int = 0,
                 dataset: str = "a", registry: HeadRegistry | None = None, which: tuple[str, np.ndarray] | None = None):
        """``dataset`` labels the noise draws; ``which`` = (dataset, indices) says which images of which dataset
        ``images`` are, for their captions (default: ``dataset``'s first ``len(images)``)."""
        if method not in ("mean", "zero"):
            raise ValueError("circuit losses use mean or zero ablation")
        self.net, self.method, self.eps_hat = denoiser.network, method, denoiser.eps_hat
        self.which = which or (dataset, np.arange(len(images)))
        device = model_device(self.net)
        x0 = torch.from_numpy(np.asarray(images, dtype=np.float32)).to(device)
        self.registry = registry or probe_registry(self.net, x0[:1], torch.zeros(1, dtype=torch.long, device=device))
        self.heads = list(self.registry)
        self.inputs, self.means = [], []
        with torch.no_grad():
            for t_val in timesteps:
                eps = batch_noise(x0.shape[1:], seed=seed, dataset=dataset, images=range(len(x0)), timestep=t_val).to(device)
                t = torch.full((len(x0),), t_val, dtype=torch.long, device=device)
                x_t = add_noise(x0, eps, t, denoiser.alphas_cumprod)
                moments = ActivationMoments()
                with images_of(self.net, *self.which):
                    moments.add(clean_activations(self.net, self.registry, x_t, t, [])[1])
                self.inputs.append((x_t, t, eps))
                self.means.append({i.layer: moments.mean(i.layer) for i in self.registry.layers})
        self.evaluations = 0

    @torch.no_grad()
    def __call__(self, ablated: Sequence[HeadAddress]) -> float:
        self.evaluations += 1
        total = 0.0
        for (x_t, t, eps), means in zip(self.inputs, self.means):
            patches = {a: (means[a.layer][a.head] if self.method == "mean" else 0.0) for a in ablated}
            with images_of(self.net, *self.which), instrument(self.net, registry=self.registry, patches=patches):
                total += eps_mse_per_image(self.eps_hat(self.net(x_t, t).sample, x_t, t), eps).mean().item()
        return total / len(self.inputs)


@dataclass(frozen=True, kw_only=True)
class Circuit:
    heads: tuple[HeadAddress, ...]
    tau: float
    method: str
    loss_full: float
    loss_empty: float
    loss_circuit: float  # everything outside the circuit ablated
    loss_without_circuit: float  # only the circuit ablated

    def _recovered(self, loss: float) -> float:
        gap = self.loss_empty - self.loss_full
        return (self.loss_empty - loss) / gap if abs(gap) > 1e-9 * abs(self.loss_full) else float("nan")

    @property
    def faithfulness(self) -> float:
        """NaN when ablating every head does not change the loss (nothing to recover)."""
        return self._recovered(self.loss_circuit)

    @property
    def completeness(self) -> float:
        return self._recovered(self.loss_without_circuit)


def _circuit(loss: CircuitLoss, kept: list[HeadAddress], tau: float, full: float, empty: float) -> Circuit:
    outside = [a for a in loss.heads if a not in kept]
    return Circuit(heads=tuple(sorted(kept)), tau=tau, method=loss.method, loss_full=full, loss_empty=empty,
                   loss_circuit=loss(outside), loss_without_circuit=loss(kept))


def prune_circuit(loss: CircuitLoss, importance: dict[HeadAddress, float], tau: float, *,
                  search: str = "grouped") -> Circuit:
    """Remove heads, least important first, while the relative loss increase stays ≤ τ."""
    if search not in ("grouped", "sequential"):
        raise ValueError(f"search must be 'grouped' or 'sequential', not {search!r}")
    full, empty = loss([]), loss(loss.heads)
    removed: list[HeadAddress] = []

    def passes(extra: Sequence[HeadAddress]) -> bool:
        return (loss([*removed, *extra]) - full) / full <= tau

    order = sorted(loss.heads, key=lambda a: (importance.get(a, 0.0), str(a)))
    if search == "sequential":
        for head in order:
            if passes([head]):
                removed.append(head)
    else:  # galloping: a run that passes doubles the next run's length; a failure halves it, from the same head
        i, size = 0, 1
        while i < len(order):
            run = order[i:i + size]
            if passes(run):
                removed.extend(run)
                i, size = i + len(run), 2 * size
            elif size == 1:
                i += 1  # this head stays in the circuit, decided exactly as one-at-a-time would
            else:
                size //= 2
    return _circuit(loss, [a for a in loss.heads if a not in removed], tau, full, empty)


def curve_sizes(n_heads: int) -> list[int]:
    """Circuit sizes for a curve: 0, 1, 2, 3, 4, 6, 8, 12, 16, 24, ... and all heads."""
    sizes, k = {0, n_heads}, 1
    while k < n_heads:
        sizes.update({k, min(n_heads, k + k // 2)})
        k *= 2
    return sorted(s for s in sizes if s <= n_heads)


def circuit_curve(loss: CircuitLoss, importance: dict[HeadAddress, float], sizes: Sequence[int] | None = None) -> list[dict]:
    """Faithfulness and completeness of the top-k heads by importance, for each size k."""
    order = sorted(loss.heads, key=lambda a: (-importance.get(a, 0.0), str(a)))
    full, empty = loss([]), loss(loss.heads)
    out = []
    for k in curve_sizes(len(order)) if sizes is None else sizes:
        c = _circuit(loss, order[:k], float("nan"), full, empty)
        out.append({"size": int(k), "loss_circuit": c.loss_circuit, "loss_without_circuit": c.loss_without_circuit,
                     "faithfulness": c.faithfulness, "completeness": c.completeness})
    return out


def grow_circuit(loss: CircuitLoss, importance: dict[HeadAddress, float], tau: float) -> Circuit:
    """Add heads, most important first, until the circuit alone is within τ of the full model."""
    full, empty = loss([]), loss(loss.heads)
    kept: list[HeadAddress] = []
    for head in sorted(loss.heads, key=lambda a: (-importance.get(a, 0.0), str(a))):
        if (loss([a for a in loss.heads if a not in kept]) - full) / full <= tau:
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
