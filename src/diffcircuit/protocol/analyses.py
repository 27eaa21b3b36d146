"""Derived tables, computed from ``head_metrics`` alone (so a report can be rebuilt from tables).

- ``head_summary``: per dataset x timestep x head x metric, the mean over images with a 95 %
  percentile-bootstrap CI (images resampled, one bootstrap per dataset and timestep for all heads);
- ``head_roles``: each head's role per timestep (``metrics.roles``);
- ``divergence`` / ``divergence_heads``: per timestep, the JSD between the datasets' per-image head
  entropies averaged over heads with CI and permutation null; and each head's own JSD.
"""

from __future__ import annotations

import pandas as pd

from diffcircuit.metrics.attention import HEAD_METRICS
from diffcircuit.metrics.roles import assign_roles
from diffcircuit.stats.bootstrap import column_mean_cis
from diffcircuit.stats.divergence import mean_jsd_test

__all__ = ["SUMMARY_METRICS", "derived_tables", "divergence_tables", "head_summary_table"]

SUMMARY_METRICS = ("entropy_nats", "entropy_norm", *HEAD_METRICS)


def head_summary_table(heads: pd.DataFrame, *, seed: int = 0) -> pd.DataFrame:
    """Long table: dataset, timestep, layer, head, metric, mean, ci_low, ci_high, n_images."""
    frames = []
    for (dataset, t), g in heads.groupby(["dataset", "timestep"], sort=True):
        wide = g.pivot_table(index="image", columns=["layer", "head"], values=list(SUMMARY_METRICS), dropna=False)
        mean, low, high = column_mean_cis(wide.to_numpy(), seed=seed)
        cols = wide.columns.to_frame(index=False).rename(columns={None: "metric"})
        cols.columns = ["metric", "layer", "head"]
        frames.append(cols.assign(dataset=dataset, timestep=int(t), mean=mean, ci_low=low, ci_high=high,
                                  n_images=len(wide)))
    order = ["dataset", "timestep", "layer", "head", "metric", "mean", "ci_low", "ci_high", "n_images"]
    return pd.concat(frames, ignore_index=True)[order]


def divergence_tables(heads: pd.DataFrame, *, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per timestep (mean over heads, with CI and null) and per head, JSD in bits of entropies a vs b."""
    rows, per_head = [], []
    for t, g in heads.groupby("timestep", sort=True):
        wide = g.pivot_table(index=["dataset", "image"], columns=["layer", "head"], values="entropy_nats")
        res = mean_jsd_test(wide.loc["a"].to_numpy(), wide.loc["b"].to_numpy(), seed=seed)
        rows.append({"timestep": int(t), "value": res.value, "bias_corrected": res.bias_corrected,
                     "ci_low": res.ci_low, "ci_high": res.ci_high, "null_value": res.null_value,
                     "p_value": res.p_value, "n_permutations": res.n_permutations})
        cols = wide.columns.to_frame(index=False)
        per_head.append(cols.assign(timestep=int(t), jsd_bits=res.per_head)[["timestep", "layer", "head", "jsd_bits"]])
    return pd.DataFrame(rows), pd.concat(per_head, ignore_index=True)


def derived_tables(heads: pd.DataFrame, *, seed: int = 0) -> dict[str, pd.DataFrame]:
    """Every table derived from ``head_metrics``, by file stem."""
    divergence, divergence_heads = divergence_tables(heads, seed=seed)
    return {
        "head_summary": head_summary_table(heads, seed=seed),
        "head_roles": assign_roles(heads),
        "divergence": divergence,
        "divergence_heads": divergence_heads,
    }
