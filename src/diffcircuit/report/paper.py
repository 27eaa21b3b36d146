"""The paper's headline claims (arXiv 2506.17237, abstract) beside this run's measurement of each, at informative
timesteps only: ``summary.paper_comparison``. The paper's numbers are shown, never used in a computation."""

from __future__ import annotations

from diffcircuit.report.result import Summary

__all__ = ["PAPER_CLAIMS", "PAPER_DIVERGENCE_DEFINITION", "paper_comparison"]


# The paper's headline numbers (arXiv 2506.17237, abstract), shown next to ours; never used in a computation.
PAPER_CLAIMS = {
    "complexity_ratio": "1.084 ± 0.008 (p < 0.001)",
    "divergence_range": "0.015 – 0.166",
    "role_entropy_nats": {
        "edge": "3.18 ± 0.12",
        "texture": "4.16 ± 0.08 (≈ ln 64: uniform over 8×8)",
        "semantic": "2.67 ± 0.15",
    },
    "degradation_range_pct": "25.6 – 128.3",
}


PAPER_DIVERGENCE_DEFINITION = (
    "unknown: the abstract gives the range without saying which quantity is compared, "
    "in which units, or how it is estimated"
)


def _range(rows: list[dict], key: str, keys: tuple[str, ...]) -> dict:
    """The timesteps with the smallest and the largest ``key``, each with ``keys``."""
    finite = [r for r in rows if r.get(key) is not None]
    if not finite:
        return {}
    lo, hi = min(finite, key=lambda r: r[key]), max(finite, key=lambda r: r[key])
    return {
        "low": {k: lo[k] for k in ("timestep", key, *keys)},
        "high": {k: hi[k] for k in ("timestep", key, *keys)},
    }


def _paper_divergence(div: list[dict]) -> dict:
    return {
        "paper_definition": PAPER_DIVERGENCE_DEFINITION,
        "entropy_difference_nats": {
            "measure": "mean over heads of the entropy difference b − a, nats (95 % CI over images)",
            **_range(
                div,
                "entropy_diff_nats",
                ("ci_low_nats", "ci_high_nats", "ci_withheld", "p_value", "can_reject"),
            ),
        },
        "wasserstein_excess_nats": {
            "measure": "mean over heads of the Wasserstein-1 distance between the datasets' "
            "entropy distributions, less its permutation-null mean, nats",
            **_range(div, "wasserstein_excess_nats", ("wasserstein_p", "wasserstein_can_reject")),
        },
        "legacy_jsd_bits_10bins": {
            "measure": "legacy: mean over heads of the JSD of 10-bin histograms, bits; saturates "
            "and depends on the bins and n, not comparable",
            **_range(div, "legacy_jsd_bits_10bins", ()),
        },
    }


def paper_comparison(summary: Summary) -> dict:
    """Our measurement of each of the paper's headline claims, with its CI / p / baseline, at informative
    timesteps only (``excluded_timesteps`` lists the others: computed, but not headline claims)."""
    out = {"paper": PAPER_CLAIMS}
    keep = summary.informative
    both = {int(t) for t in summary.timesteps if ("a", int(t)) in keep and ("b", int(t)) in keep}
    out["excluded_timesteps"] = sorted(int(t) for t in summary.timesteps if int(t) not in both)
    ratio = summary.complexity_ratio
    if ratio and not ratio["stand_in_for"]:
        out["complexity_ratio"] = {k: ratio[k] for k in ("measure", "paper_ratio", "pooled")}
        out["complexity_ratio"]["per_timestep"] = [
            r for r in ratio["per_timestep"] if int(r["timestep"]) in both
        ]
        if (
            out["excluded_timesteps"] and ratio["pooled"] is not None
        ):  # the pool includes them: not comparable
            out["complexity_ratio"]["pooled"] = None
            out["complexity_ratio"]["pooled_withheld"] = (
                "pools the uninformative timesteps "
                + ", ".join(map(str, out["excluded_timesteps"]))
            )
    elif ratio:
        out["complexity_ratio"] = {
            "withheld": ratio["note"] + "; no comparison with the paper's number"
        }
    divergence = [r for r in summary.entropy_divergence if int(r["timestep"]) in both]
    if divergence:
        out["divergence_range"] = _paper_divergence(divergence)
    roles = {}
    for r in summary.roles:
        if (
            r["role"] in PAPER_CLAIMS["role_entropy_nats"]
            and (r["dataset"], int(r["timestep"])) in keep
        ):
            roles.setdefault(r["role"], []).append(
                {
                    "timestep": r["timestep"],
                    "n_heads": r["n_heads"],
                    **{
                        d: {
                            "entropy_nats": v["entropy_nats"],
                            "uniform_nats": v["uniform_nats"],
                            "entropy_norm": v["entropy_norm"]["mean"],
                        }
                        for d, v in r["per_dataset"].items()
                    },
                }
            )
    out["role_entropy_nats"] = {
        role: roles.get(role, []) for role in PAPER_CLAIMS["role_entropy_nats"]
    }
    ablation = summary.ablation
    if ablation:
        out["degradation_range_pct"] = ablation[
            "degradation_range_pct"
        ]  # informative timesteps only
        out["degradation_range_excluded"] = ablation.get("excluded", [])
    return out
