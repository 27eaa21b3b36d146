"""Circuit discovery: losses over head sets (memoised, stacked), the gap test, pruning and growing circuits,
necessity, curves, and planted ground truth for checking them."""

from diffcircuit.discovery.circuits import (
    Circuit,
    GapTest,
    OutOfBag,
    circuit_curve,
    gap_test,
    grow_circuit,
    jaccard,
    necessary_heads,
    out_of_bag_faithfulness,
    prune_circuit,
    ranking_auc,
)
from diffcircuit.discovery.loss import CircuitLoss, ResampledLoss

__all__ = [
    "Circuit",
    "CircuitLoss",
    "GapTest",
    "OutOfBag",
    "ResampledLoss",
    "circuit_curve",
    "gap_test",
    "grow_circuit",
    "jaccard",
    "necessary_heads",
    "out_of_bag_faithfulness",
    "prune_circuit",
    "ranking_auc",
]
