"""``summary.json``: the run's machine-readable headline, computed from the tables alone.

Every mean comes with a 95 % percentile-bootstrap CI over images (the independent unit). Entropy
is given in nats, normalised (1.0 = uniform attention), and next to the uniform baseline ln(n_keys)
of each layer, so that "entropy ≈ ln 64" reads as what it is: uniform attention over an 8x8 map.
"""

from __future__ import annotations


import numpy as np
import pandas as pd

from diffcircuit.metrics.roles import ROLE_DEFINITIONS
from diffcircuit.stats.bootstrap import mean_ci

__all__ = ["PAPER_CLAIMS", "PENDING_ANALYSES", "build_summary"]

PENDING_ANALYSES = ("ablation", "patching", "attribution", "complexity_ratio", "random_head_null", "seed_variance",
                    "circuits")


def _ci_entry(values, seed: int) -> dict:
    mean, low, high = mean_ci(values, seed=seed)
    return {"mean": mean, "ci_low": low, "ci_high": high}


def _denoising(images: pd.DataFrame, seed: int) -> list[dict]:
    out = []
    for (dataset, t), g in images.groupby(["dataset", "timestep"], sort=True):
        entry = {"dataset": dataset, "timestep": int(t), "n_images": int(len(g))}
        for col in ("eps_mse", "eps_mse_trivial", "x0_mse", "x0_mse_trivial"):
            entry[col] = _ci_entry(g[col].to_numpy(), seed)
        entry["beats_trivial_eps"] = bool(g["eps_mse"].mean() < g["eps_mse_trivial"].mean())
        out.append(entry)
    return out


def _entropy(heads: pd.DataFrame, seed: int) -> list[dict]:
    """Per dataset x timestep: mean over heads of each image's normalised entropy, CI over images."""
    out = []
    per_image = heads.groupby(["dataset", "timestep", "image"])["entropy_norm"].mean().reset_index()
    for (dataset, t), g in per_image.groupby(["dataset", "timestep"], sort=True):
        out.append({"dataset": dataset, "timestep": int(t), "entropy_norm": _ci_entry(g["entropy_norm"].to_numpy(), seed)})
    return out


def _entropy_by_layer(heads: pd.DataFrame) -> list[dict]:
    out = []
    grouped = heads.groupby(["dataset", "timestep", "layer"], sort=False)
    for (dataset, t, layer), g in grouped:
        n_keys = int(g["n_keys"].max())  # keys per image: the same for every image unless captions are masked
        out.append({
            "dataset": dataset, "timestep": int(t), "layer": layer, "n_keys": n_keys,
            "entropy_nats": float(g["entropy_nats"].mean()), "uniform_nats": float(np.log(g["n_keys"]).mean()),
            "entropy_norm": float(g["entropy_norm"].mean()),
        })
    return out


def _roles(heads: pd.DataFrame, roles: pd.DataFrame, seed: int) -> list[dict]:
    """Per timestep and role: its heads, and per dataset its entropy (nats, normalised) with CIs."""
    out = []
    for (t, role), members in roles.groupby(["timestep", "role"], sort=True):
        keys = set(zip(members.layer, members["head"]))
        rows = heads[(heads.timestep == t) & pd.Series(list(zip(heads.layer, heads["head"])), index=heads.index).isin(keys)]
        per_dataset = {}
        for dataset, g in rows.groupby("dataset", sort=True):
            per_image = g.groupby("image")[["entropy_nats", "entropy_norm"]].mean()
            per_dataset[dataset] = {
                "entropy_nats": _ci_entry(per_image["entropy_nats"].to_numpy(), seed),
                "entropy_norm": _ci_entry(per_image["entropy_norm"].to_numpy(), seed),
                "uniform_nats": float(np.log(g["n_keys"]).mean()),
            }
        out.append({"role": role, "timestep": int(t), "n_heads": len(keys),
                    "heads": [f"{layer}:{head}" for layer, head in zip(members.layer, members["head"])],
                    "definition": ROLE_DEFINITIONS.get(role, ""), "per_dataset": per_dataset})
    return out


def _ablation(ablations: pd.DataFrame, critical: pd.DataFrame | None, seed: int, top: int = 5) -> dict:
    """Degradation range per level and method, the largest effects, and the critical components.

    A target's degradation is its mean over images, datasets and timesteps; CIs resample images
    (each image's degradation averaged over its timesteps first). ``critical``: components whose
    excess degradation over random heads of the same count is significant after BH correction.
    """
    ablations = ablations[ablations.level != "random"]
    per_target = ablations.groupby(["level", "method", "target"], sort=False)["degradation_pct"].mean().reset_index()
    ranges = {}
    for (level, method), g in per_target.groupby(["level", "method"], sort=False):
        ranges.setdefault(level, {})[method] = [float(g.degradation_pct.min()), float(g.degradation_pct.max())]
    largest = []
    for (level, method), g in per_target.groupby(["level", "method"], sort=False):
        for target in g.nlargest(top if level == "head" else 1, "degradation_pct").target:
            rows = ablations[(ablations.level == level) & (ablations.method == method) & (ablations.target == target)]
            per_image = rows.groupby(["dataset", "image"])["degradation_pct"].mean().to_numpy()
            x0 = rows.x0_mse_intervened.mean() / rows.x0_mse_clean.mean()
            largest.append({"level": level, "method": method, "target": target,
                            "degradation_pct": _ci_entry(per_image, seed), "x0_mse_ratio": float(x0)})
    out = {"methods": sorted(ablations.method.unique()), "n_images": int(ablations.groupby("dataset").image.nunique().max()),
           "degradation_range_pct": ranges, "largest": largest}
    if critical is not None:
        hits = critical[critical.critical].sort_values("excess_pct", ascending=False)
        out["critical"] = [{k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}
                           for row in hits[["level", "method", "target", "degradation_pct", "null_degradation_pct",
                                            "excess_pct", "ci_low", "ci_high", "p_corrected"]].to_dict("records")]
        out["n_critical"] = {f"{lv}/{m}": int(g.critical.sum()) for (lv, m), g in critical.groupby(["level", "method"])}
        out["n_tested"] = {f"{lv}/{m}": int(len(g)) for (lv, m), g in critical.groupby(["level", "method"])}
    return out


def _patching(patching: pd.DataFrame, manifest: dict, seed: int, top: int = 5) -> dict:
    """The components whose activation, patched from b into a, moves a's output furthest toward b's."""
    per_target = patching.groupby(["level", "target"], sort=False)["moved_frac"].mean().reset_index()
    best = []
    for level, g in per_target.groupby("level", sort=False):
        for target in g.nlargest(top, "moved_frac").target:
            per_pair = patching[patching.target == target].groupby("pair")["moved_frac"].mean().to_numpy()
            best.append({"level": level, "target": target, "moved_frac": _ci_entry(per_pair, seed)})
    return {"source": manifest["datasets"]["b"]["spec"], "receiver": manifest["datasets"]["a"]["spec"],
            "n_pairs": int(patching.pair.nunique()), "largest": best}


def _attribution(attribution: pd.DataFrame, ablations: pd.DataFrame) -> list[dict]:
    """How well each estimator ranks heads like the exhaustive sweep: Spearman ρ per method, dataset, timestep."""
    from scipy.stats import spearmanr

    exact = (ablations[ablations.level == "head"].groupby(["method", "dataset", "timestep", "target"])
             ["degradation_pct"].mean())
    est = attribution.assign(target=attribution.layer + ":" + attribution["head"].astype(str))
    est = est.groupby(["estimator", "method", "dataset", "timestep", "target"])["degradation_pct"].mean()
    out = []
    for (estimator, method, dataset, t), g in est.groupby(level=[0, 1, 2, 3], sort=True):
        truth = exact.loc[(method, dataset, t)]
        guess = g.droplevel([0, 1, 2, 3]).reindex(truth.index)
        top = len(set(truth.nlargest(5).index) & set(guess.nlargest(5).index))
        out.append({"estimator": estimator, "method": method, "dataset": dataset, "timestep": int(t),
                    "spearman": float(spearmanr(guess, truth).statistic), "top5_overlap": top})
    return out


def _complexity(complexity: pd.DataFrame) -> tuple[dict, list[dict]]:
    rows = complexity.to_dict("records")
    primary = next((r for r in rows if r["primary"]), rows[0])
    headline = {k: primary[k] for k in ("measure", "value", "ci_low", "ci_high", "p_value")}
    headline["n_permutations"] = primary["n_permutations"]
    return headline, rows


def _tests(tests: pd.DataFrame) -> dict:
    families = {}
    for family, g in tests.groupby("family", sort=False):
        families[family] = {"n_tests": int(len(g)), "significant_bh_0.05": int((g.p_corrected < 0.05).sum())}
    return {"n_tests": int(len(tests)), "correction": "within each family (see the run's config: fdr_bh or holm)",
            "families": families}


def _seed_variance(table: pd.DataFrame) -> list[dict]:
    out = []
    for (quantity, dataset, t), g in table.groupby(["quantity", "dataset", "timestep"], sort=True):
        v = g.value.to_numpy()
        out.append({"quantity": quantity, "dataset": dataset, "timestep": int(t), "seeds": [int(x) for x in g.seed],
                    "mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                    "min": float(v.min()), "max": float(v.max())})
    return out


def _circuits(found: list[dict]) -> dict:
    """Circuit size (with its bootstrap interval), faithfulness, completeness and cross-dataset overlap per window."""
    out = {"tau": None, "method": None, "ranking": None, "windows": []}
    for c in found:
        out["tau"], out["method"], out["ranking"] = c["tau"], c["method"], c.get("ranking")
        entry = {k: c[k] for k in ("dataset", "window", "timesteps", "method", "faithfulness", "completeness")}
        entry["size"] = len(c["heads"])
        entry["size_ci"] = c.get("size_ci")
        overlap = c.get("overlap_with_other", {})
        entry["overlap_with_other"] = {k: v for k, v in overlap.items() if k in ("jaccard", "ci_low", "ci_high", "resamples")}
        entry["unique"] = overlap.get("only_a" if c["dataset"] == "a" else "only_b", [])
        out["windows"].append(entry)
    return out


# The paper's headline numbers (arXiv 2506.17237, abstract), shown next to ours; never used in a computation.
PAPER_CLAIMS = {
    "complexity_ratio": "1.084 ± 0.008 (p < 0.001)",
    "divergence_range": "0.015 – 0.166",
    "role_entropy_nats": {"edge": "3.18 ± 0.12", "texture": "4.16 ± 0.08 (≈ ln 64: uniform over 8×8)",
                          "semantic": "2.67 ± 0.15"},
    "degradation_range_pct": "25.6 – 128.3",
}


def _paper_comparison(summary: dict) -> dict:
    """Our measurement of each of the paper's headline claims, with its CI / p / baseline."""
    out = {"paper": PAPER_CLAIMS}
    ratio = summary.get("complexity_ratio")
    if ratio:
        out["complexity_ratio"] = {k: ratio[k] for k in ("measure", "value", "ci_low", "ci_high", "p_value")}
    div = summary["entropy_divergence"]
    if div:
        lo, hi = min(div, key=lambda d: d["bias_corrected"]), max(div, key=lambda d: d["bias_corrected"])
        out["divergence_range"] = {"measure": "mean JSD of per-head entropy distributions, bits, bias-corrected",
                                   "low": {k: lo[k] for k in ("timestep", "bias_corrected", "ci_low", "ci_high", "p_value")},
                                   "high": {k: hi[k] for k in ("timestep", "bias_corrected", "ci_low", "ci_high", "p_value")}}
    roles = {}
    for r in summary["roles"]:
        if r["role"] in PAPER_CLAIMS["role_entropy_nats"]:
            roles.setdefault(r["role"], []).append({"timestep": r["timestep"], "n_heads": r["n_heads"], **{
                d: {"entropy_nats": v["entropy_nats"], "uniform_nats": v["uniform_nats"],
                    "entropy_norm": v["entropy_norm"]["mean"]} for d, v in r["per_dataset"].items()}})
    out["role_entropy_nats"] = {role: roles.get(role, []) for role in PAPER_CLAIMS["role_entropy_nats"]}
    ablation = summary.get("ablation")
    if ablation:
        out["degradation_range_pct"] = ablation["degradation_range_pct"]
    return out


def build_summary(*, manifest: dict, heads: pd.DataFrame, images: pd.DataFrame, roles: pd.DataFrame,
                  divergence: pd.DataFrame, ablations: pd.DataFrame | None = None,
                  patching: pd.DataFrame | None = None, attribution: pd.DataFrame | None = None,
                  complexity: pd.DataFrame | None = None, tests: pd.DataFrame | None = None,
                  critical: pd.DataFrame | None = None, seed_variance: pd.DataFrame | None = None,
                  circuits: list[dict] | None = None) -> dict:
    """The headline of a run: what is known so far, with CIs."""
    seed = int(manifest["config"]["seed"])
    done = {"ablation": ablations is not None, "patching": patching is not None,
            "attribution": attribution is not None and ablations is not None,
            "complexity_ratio": complexity is not None and bool(complexity.primary.any()),
            "random_head_null": critical is not None, "seed_variance": seed_variance is not None,
            "circuits": bool(circuits)}
    headline, measures = _complexity(complexity) if complexity is not None and len(complexity) else (None, [])
    pending = [p for p in PENDING_ANALYSES if not done.get(p)]
    summary = {
        "model": manifest["model"],
        "seed": seed,
        "datasets": manifest["datasets"],
        "timesteps": manifest["config"]["timesteps"],
        "denoising": _denoising(images, seed),
        "entropy": _entropy(heads, seed),
        "entropy_by_layer": _entropy_by_layer(heads),
        "roles": _roles(heads, roles, seed),
        "entropy_divergence": divergence.sort_values("timestep").to_dict("records"),
        "ablation": _ablation(ablations, critical, seed) if ablations is not None else None,
        "patching": _patching(patching, manifest, seed) if patching is not None else None,
        "attribution": _attribution(attribution, ablations) if done["attribution"] else None,
        "complexity_ratio": headline,
        "complexity_measures": measures,
        "tests": _tests(tests) if tests is not None else None,
        "seed_variance": _seed_variance(seed_variance) if seed_variance is not None else None,
        "circuits": _circuits(circuits) if circuits else None,
        "pending": pending,
    }
    summary["paper_comparison"] = _paper_comparison(summary)
    return summary
