"""Derived tables, computed from ``head_metrics`` alone (so a report can be rebuilt from tables).

- ``head_summary``: per dataset x timestep x head x metric, the mean over images with a 95 %
  percentile-bootstrap CI (images resampled, one bootstrap per dataset and timestep for all heads);
- ``head_roles``: each head's role per timestep (``metrics.roles``);
- ``divergence`` / ``divergence_heads``: per timestep, the JSD between the datasets' per-image head
  entropies averaged over heads with CI and permutation null; and each head's own JSD;
- ``complexity``: each complexity measure per dataset and the b/a ratio with CI and p-value
  (``stats.complexity``); the primary measure is the participation ratio of single-head mean-ablation
  effects — causal, and the effective number of heads that matter;
- ``critical``: every head, layer and block ablation against random heads of the same count;
- ``tests``: every hypothesis test performed, with p, corrected p within its family
  (Benjamini–Hochberg by default, Holm with ``correction="holm"``), effect size and n.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from diffcircuit.metrics.attention import HEAD_METRICS
from diffcircuit.metrics.roles import assign_roles
from diffcircuit.stats.bootstrap import column_mean_cis, mean_ci
from diffcircuit.stats.complexity import heads_for_fraction, mean_value, participation_ratio, ratio_test
from diffcircuit.stats.divergence import head_jsd, mean_jsd_test
from diffcircuit.stats.tests import correct_pvalues, paired_test, two_sample_test

__all__ = ["PRIMARY_COMPLEXITY", "SUMMARY_METRICS", "complexity_table", "critical_table", "derived_tables",
           "divergence_tables", "guidance_table", "head_summary_table", "seed_quantities", "tests_table"]

PRIMARY_COMPLEXITY = "ablation_participation_ratio"
_N_RESAMPLES = 2000

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


def _per_image(frame: pd.DataFrame, columns: list[str], value: str) -> dict[str, pd.DataFrame]:
    """dataset -> [images x columns] of ``value`` averaged over timesteps (one row per independent unit)."""
    wide = frame.pivot_table(index=["dataset", "image"], columns=columns, values=value, aggfunc="mean")
    return {d: wide.loc[d] for d in ("a", "b")}


def _ablation_method(ablations: pd.DataFrame) -> str:
    methods = set(ablations.method)
    return "mean" if "mean" in methods else sorted(methods)[0]


def complexity_table(heads: pd.DataFrame, ablations: pd.DataFrame | None, *, seed: int = 0) -> pd.DataFrame:
    """One row per complexity measure: value on a and b, ratio b/a, 95 % CI, permutation p."""
    plans = []
    if ablations is not None:
        single = ablations[(ablations.level == "head") & (ablations.method == _ablation_method(ablations))]
        effects = _per_image(single, ["target"], "degradation_pct")
        plans += [(PRIMARY_COMPLEXITY, effects, participation_ratio), ("ablation_heads_for_90pct", effects, heads_for_fraction)]
    plans += [("mean_entropy_norm", _per_image(heads, ["layer", "head"], "entropy_norm"), mean_value),
              ("mean_effective_keys_frac", _per_image(heads, ["layer", "head"], "effective_keys_frac"), mean_value)]
    rows = []
    for name, per_image, measure in plans:
        res = ratio_test(per_image["a"].to_numpy(), per_image["b"].to_numpy(), measure, seed=seed)
        rows.append({"measure": name, "primary": name == PRIMARY_COMPLEXITY, **res.to_dict()})
    return pd.DataFrame(rows)


def critical_table(ablations: pd.DataFrame, *, seed: int = 0, correction: str = "fdr_bh") -> pd.DataFrame:
    """Each head, layer and block ablation against random heads of the same count, paired over images.

    Unit: an image (of either dataset), its degradation averaged over timesteps. Null for a head: the
    mean degradation of all single heads on that image (the expectation for a random head); for a
    layer or block of k heads: the mean over the random k-head sets on that image. A component is
    critical when its excess over the null is positive and significant (sign-flip permutation test,
    Benjamini–Hochberg over the components of its level and method, q < 0.05).
    """
    units = ["dataset", "image"]
    per_unit = (ablations.groupby(["level", "target", "n_heads", "method", *units], sort=False)["degradation_pct"]
                .mean().unstack(units))  # rows: components; columns: images
    index = per_unit.index.to_frame(index=False)
    rows = []
    for i, comp in index.iterrows():
        if comp.level not in ("head", "layer", "block"):
            continue
        same_method = index.method == comp.method
        if comp.level == "head":
            null_rows = same_method & (index.level == "head")
        else:
            null_rows = same_method & (index.level == "random") & (index.n_heads == comp.n_heads)
        if not null_rows.any():
            continue
        values, null = per_unit.iloc[i].to_numpy(), per_unit[null_rows.to_numpy()].mean(axis=0).to_numpy()
        res = paired_test(values, null, n_resamples=_N_RESAMPLES, seed=seed)
        _, low, high = mean_ci(values - null, seed=seed)
        rows.append({"level": comp.level, "method": comp.method, "target": comp.target, "n_heads": int(comp.n_heads),
                     "degradation_pct": float(values.mean()), "null_degradation_pct": float(null.mean()),
                     "excess_pct": res.statistic, "ci_low": low, "ci_high": high, "p_value": res.p_value,
                     "p_floor": res.p_floor, "effect_size": res.effect_size, "n_units": len(values)})
    frame = pd.DataFrame(rows)
    frame["p_corrected"] = np.nan
    for _, idx in frame.groupby(["level", "method"]).groups.items():
        frame.loc[idx, "p_corrected"] = correct_pvalues(frame.loc[idx, "p_value"].to_numpy(), correction)
    frame["critical"] = (frame.p_corrected < 0.05) & (frame.excess_pct > 0)
    return frame


def _family(rows: list[dict], family: str, correction: str) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    frame.insert(0, "family", family)
    frame["p_corrected"] = correct_pvalues(frame.p_value.to_numpy(), correction)
    return frame


def tests_table(heads: pd.DataFrame, ablations: pd.DataFrame | None, divergence: pd.DataFrame,
                complexity: pd.DataFrame, critical: pd.DataFrame | None = None, *, seed: int = 0,
                correction: str = "fdr_bh") -> pd.DataFrame:
    """Every test performed; p corrected by Benjamini–Hochberg within each family."""
    families = []
    entropy_rows = []
    for (t, layer, head), g in heads.groupby(["timestep", "layer", "head"], sort=False):
        res = two_sample_test(g.entropy_nats[g.dataset == "b"], g.entropy_nats[g.dataset == "a"], n_resamples=_N_RESAMPLES, seed=seed)
        entropy_rows.append({"what": f"entropy_nats b vs a, t={t}, {layer}:{head}", **res.to_dict()})
    families.append(_family(entropy_rows, "entropy_difference", correction))
    if ablations is not None:
        paired_rows = []
        for (level, target, method, dataset, t), g in ablations.groupby(["level", "target", "method", "dataset", "timestep"], sort=False):
            res = paired_test(g.mse_intervened, g.mse_clean, n_resamples=_N_RESAMPLES, seed=seed)
            paired_rows.append({"what": f"{method} ablation of {level} {target}, dataset {dataset}, t={t}: ε-MSE ablated vs clean",
                                **res.to_dict()})
        families.append(_family(paired_rows, "ablation_paired", correction))
    if critical is not None and len(critical):
        families.append(critical.assign(
            family="critical_vs_random_heads", test="permutation (paired sign-flip)",
            what=critical.method + " ablation of " + critical.level + " " + critical.target + " vs random heads of the same count",
            statistic=critical.excess_pct, effect_size_kind="cohens_dz", n_a=critical.n_units, n_b=critical.n_units,
            n_resamples=_N_RESAMPLES)[["family", "what", "test", "statistic", "p_value", "p_floor", "effect_size",
                                       "effect_size_kind", "n_a", "n_b", "n_resamples", "p_corrected"]])
    families.append(_family([{"what": f"entropy JSD a vs b, t={r.timestep}", "test": "permutation (labels over images)",
                              "statistic": r.value, "p_value": r.p_value, "p_floor": 1 / (r.n_permutations + 1),
                              "effect_size": r.bias_corrected, "effect_size_kind": "jsd_bias_corrected_bits",
                              "n_a": int(heads[heads.dataset == "a"].image.nunique()),
                              "n_b": int(heads[heads.dataset == "b"].image.nunique()),
                              "n_resamples": r.n_permutations} for r in divergence.itertuples()], "divergence", correction))
    families.append(_family([{"what": f"complexity ratio b/a: {r.measure}", "test": "permutation (labels over images)",
                              "statistic": r.value, "p_value": r.p_value, "p_floor": 1 / (r.n_permutations + 1),
                              "effect_size": float(np.log(r.value)) if r.value > 0 else float("nan"),
                              "effect_size_kind": "log_ratio", "n_a": r.n_a, "n_b": r.n_b,
                              "n_resamples": r.n_permutations} for r in complexity.itertuples()], "complexity_ratio", correction))
    return pd.concat([f for f in families if not f.empty], ignore_index=True)


def seed_quantities(heads: pd.DataFrame, seed: int) -> pd.DataFrame:
    """Headline quantities of one noise seed: mean normalised entropy per dataset and timestep, and
    the plug-in entropy divergence per timestep (for the spread across seeds)."""
    rows = [{"seed": seed, "quantity": "mean_entropy_norm", "dataset": d, "timestep": int(t), "value": float(g.entropy_norm.mean())}
            for (d, t), g in heads.groupby(["dataset", "timestep"], sort=True)]
    for t, g in heads.groupby("timestep", sort=True):
        wide = g.pivot_table(index=["dataset", "image"], columns=["layer", "head"], values="entropy_nats")
        rows.append({"seed": seed, "quantity": "entropy_divergence_bits", "dataset": "a|b", "timestep": int(t),
                     "value": float(head_jsd(wide.loc["a"].to_numpy(), wide.loc["b"].to_numpy()).mean())})
    return pd.DataFrame(rows)


def derived_tables(heads: pd.DataFrame, ablations: pd.DataFrame | None = None, *, seed: int = 0,
                   correction: str = "fdr_bh") -> dict[str, pd.DataFrame]:
    """Every table derived from ``head_metrics`` (and ``ablations`` when run), by file stem."""
    divergence, divergence_heads = divergence_tables(heads, seed=seed)
    complexity = complexity_table(heads, ablations, seed=seed)
    extra = {"critical": critical_table(ablations, seed=seed, correction=correction)} if ablations is not None else {}
    return extra | {
        "head_summary": head_summary_table(heads, seed=seed),
        "head_roles": assign_roles(heads),
        "divergence": divergence,
        "divergence_heads": divergence_heads,
        "complexity": complexity,
        "tests": tests_table(heads, ablations, divergence, complexity, extra.get("critical"), seed=seed,
                             correction=correction),
    }


def guidance_table(conditional: pd.DataFrame, unconditional: pd.DataFrame, *, metric: str = "entropy_norm", seed: int = 0,
                   correction: str = "fdr_bh", n_resamples: int = 2000) -> pd.DataFrame:
    """What the prompt changes, head by head: per dataset x timestep x head, the paired difference of ``metric``
    between the conditional and the unconditional branch of classifier-free guidance (same images, same noise),
    with a bootstrap CI, a sign-flip permutation p and its correction over all heads of the table."""
    keys = ["dataset", "timestep", "layer", "head", "image"]
    both = conditional[keys + [metric]].merge(unconditional[keys + [metric]], on=keys, suffixes=("_cond", "_uncond"))
    rows = []
    for (dataset, t, layer, head), g in both.groupby(keys[:4], sort=True):
        a, b = g[f"{metric}_cond"].to_numpy(), g[f"{metric}_uncond"].to_numpy()
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            continue
        res = paired_test(a, b, n_resamples=n_resamples, seed=seed)
        mean, low, high = mean_ci(a - b, seed=seed)
        rows.append({"dataset": dataset, "timestep": int(t), "layer": layer, "head": int(head), "metric": metric,
                     "conditional": float(a.mean()), "unconditional": float(b.mean()), "difference": mean,
                     "ci_low": low, "ci_high": high, "p_value": res.p_value, "p_floor": res.p_floor,
                     "effect_size": res.effect_size, "n_images": len(a)})
    frame = pd.DataFrame(rows)
    frame["p_corrected"] = correct_pvalues(frame.p_value.to_numpy(), correction) if len(frame) else []
    return frame
