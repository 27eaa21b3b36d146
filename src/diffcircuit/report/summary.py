"""``summary.json``: the run's machine-readable headline, computed from the tables alone.

Every mean comes with a 95 % percentile-bootstrap CI over images (the independent unit). Entropy
is given in nats, normalised (1.0 = uniform attention), and next to the uniform baseline ln(n_keys)
of each layer, so that "entropy ≈ ln 64" reads as what it is: uniform attention over an 8x8 map.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd

from diffcircuit.interventions.attribution import ESTIMATES
from diffcircuit.metrics.roles import CONTENT_ROLES, ROLE_DEFINITIONS
from diffcircuit.protocol.analyses import (
    PAPER_COMPLEXITY_RATIO,
    PRIMARY_COMPLEXITY,
    complexity_test,
    denoising_tests,
    mean_divergence_test,
)
from diffcircuit.protocol.circuits import CircuitRecord
from diffcircuit.protocol.critical import CRITICAL_COLUMNS, informative_rows
from diffcircuit.report.paper import paper_comparison
from diffcircuit.report.result import Summary
from diffcircuit.report.validity import validity
from diffcircuit.stats.bootstrap import mean_ci
from diffcircuit.stats.tests import bootstrap_spearman, paired_spearman_ci

__all__ = ["PENDING_ANALYSES", "build_summary"]

PENDING_ANALYSES = (
    "ablation",
    "patching",
    "attribution",
    "complexity_ratio",
    "random_head_null",
    "seed_variance",
    "circuits",
)


def _ci_entry(values, seed: int) -> dict:
    mean, low, high = mean_ci(values, seed=seed)
    return {"mean": mean, "ci_low": low, "ci_high": high}


_SPEARMAN_RESAMPLES = 1000  # bootstrap resamples of images behind every Spearman ρ's CI


def _denoising(images: pd.DataFrame, seed: int, correction: str = "fdr_bh") -> list[dict]:
    """Per dataset and timestep: errors with CIs, and whether the model beats the trivial predictor — paired over
    images, one-sided, corrected over the dataset x timestep family (``protocol.analyses.denoising_tests``)."""
    tests = denoising_tests(images, correction=correction, seed=seed).set_index(
        ["dataset", "timestep"]
    )
    out = []
    for (dataset, t), g in images.groupby(["dataset", "timestep"], sort=True):
        entry = {"dataset": dataset, "timestep": int(t), "n_images": int(len(g))}
        for col in ("eps_mse", "eps_mse_trivial", "x0_mse", "x0_mse_trivial"):
            entry[col] = _ci_entry(g[col].to_numpy(), seed)
        entry["beats_trivial_eps"] = bool(g["eps_mse"].mean() < g["eps_mse_trivial"].mean())
        test = tests.loc[(dataset, int(t))]
        entry |= {
            "informative": bool(test.informative),
            "p_value": float(test.p_value),
            "p_corrected": float(test.p_corrected),
            "p_floor": float(test.p_floor),
            "ratio_to_trivial": float(test.ratio_to_trivial),
            "frac_images_worse": float(test.frac_images_worse),
            "informative_test": f"one-sided paired sign-flip over images, eps_mse < eps_mse_trivial; {correction} "
            "over the dataset x timestep family; informative = corrected p < 0.05",
        }
        out.append(entry)
    return out


def _entropy(heads: pd.DataFrame, seed: int) -> list[dict]:
    """Per dataset x timestep: mean over heads of each image's normalised entropy, CI over images."""
    out = []
    per_image = heads.groupby(["dataset", "timestep", "image"])["entropy_norm"].mean().reset_index()
    for (dataset, t), g in per_image.groupby(["dataset", "timestep"], sort=True):
        out.append(
            {
                "dataset": dataset,
                "timestep": int(t),
                "entropy_norm": _ci_entry(g["entropy_norm"].to_numpy(), seed),
            }
        )
    return out


def _entropy_by_layer(heads: pd.DataFrame) -> list[dict]:
    layers = (
        heads[["dataset", "timestep", "layer", "n_keys", "entropy_nats", "entropy_norm"]]
        .assign(uniform_nats=np.log(heads["n_keys"]))
        .groupby(["dataset", "timestep", "layer"], sort=False)
        .agg(
            n_keys=("n_keys", "max"),
            entropy_nats=("entropy_nats", "mean"),
            uniform_nats=("uniform_nats", "mean"),
            entropy_norm=("entropy_norm", "mean"),
        )
    )  # n_keys: keys per image, the same for every image unless captions are masked
    return [
        {
            "dataset": dataset,
            "timestep": int(t),
            "layer": layer,
            "n_keys": int(r.n_keys),
            "entropy_nats": float(r.entropy_nats),
            "uniform_nats": float(r.uniform_nats),
            "entropy_norm": float(r.entropy_norm),
        }
        for (dataset, t, layer), r in layers.iterrows()
    ]


def _roles(heads: pd.DataFrame, roles: pd.DataFrame, seed: int) -> list[dict]:
    """Per dataset, timestep and role (roles are assigned per dataset): its heads, how the role was decided,
    a content role's excess over its null, and the heads' entropy on that dataset (nats, normalised) with CIs."""
    keys = ["dataset", "timestep", "layer", "head"]
    labelled = (
        heads[[*keys, "image", "entropy_nats", "entropy_norm"]]
        .assign(uniform_nats=np.log(heads["n_keys"]))
        .merge(roles[[*keys, "role"]], on=keys)
    )  # every head row with its head's role on its dataset and timestep
    by_role = labelled.groupby(["dataset", "timestep", "role"])
    per_images = labelled.groupby(["dataset", "timestep", "role", "image"])[
        ["entropy_nats", "entropy_norm"]
    ].mean()
    uniform = by_role.uniform_nats.mean()
    out = []
    for (dataset, t, role), members in roles.groupby(["dataset", "timestep", "role"], sort=True):
        per_image = per_images.loc[(dataset, t, role)]
        entry = {
            "role": role,
            "dataset": dataset,
            "timestep": int(t),
            "n_heads": len(set(zip(members.layer, members["head"]))),
            "heads": [f"{layer}:{head}" for layer, head in zip(members.layer, members["head"])],
            "basis": str(members.role_basis.iloc[0]),
            "definition": ROLE_DEFINITIONS.get(role, ""),
            "per_dataset": {
                dataset: {
                    "entropy_nats": _ci_entry(per_image["entropy_nats"].to_numpy(), seed),
                    "entropy_norm": _ci_entry(per_image["entropy_norm"].to_numpy(), seed),
                    "uniform_nats": float(uniform.loc[(dataset, t, role)]),
                }
            },
        }
        if role in CONTENT_ROLES:
            probe = "object" if role == "semantic" else role
            entry["excess_log"] = {
                "median": float(members[f"{probe}_excess"].median()),
                "min": float(members[f"{probe}_excess"].min()),
                "max_q": float(members[f"{probe}_q"].max()),
            }
        out.append(entry)
    return out


def _role_evidence(roles: pd.DataFrame) -> list[dict]:
    """Per dataset and timestep and content probe: heads it labels, heads whose excess over its null is significant
    (q < 0.05, positive), and heads whose raw affinity passes the raw threshold while the null test does not."""
    out = []
    for (dataset, t), g in roles.groupby(["dataset", "timestep"], sort=True):
        raw = g.raw_only.fillna("").str.split(",")
        counts = {
            probe: {
                "labelled": int((g.role == role).sum()),
                "significant": int(((g[f"{probe}_q"] < 0.05) & (g[f"{probe}_excess"] > 0)).sum()),
                "raw_only": int(raw.apply(lambda r, p=probe: p in r).sum()),
                # the smallest q of a labelled head (the claim's evidence for this probe), None: none labelled
                "min_q_labelled": _clean(g.loc[g.role == role, f"{probe}_q"].min()),
                "tested": bool(g[f"{probe}_q"].notna().any()),
            }
            for role, probe in (
                ("semantic", "object"),
                ("edge", "edge"),
                ("texture", "texture"),
                ("intensity", "intensity"),
                ("background", "background"),
            )
        }
        out.append(
            {
                "dataset": dataset,
                "timestep": int(t),
                "n_heads": len(g),
                "n_positional": int((g.role == "positional").sum()),
                "probes": counts,
            }
        )
    return out


def _role_differences(roles: pd.DataFrame) -> list[dict]:
    """Heads whose role label on dataset a is not their label on dataset b, per timestep: descriptive (each label
    is tested against its own null; nothing here tests a difference between the datasets)."""
    if set(roles.dataset) != {"a", "b"}:
        return []
    wide = roles.pivot_table(
        index=["timestep", "layer", "head"], columns="dataset", values="role", aggfunc="first"
    )
    differ = wide[wide["a"] != wide["b"]].reset_index()
    return [
        {"timestep": int(r.timestep), "head": f"{r.layer}:{r.head}", "a": r.a, "b": r.b}
        for r in differ.itertuples()
    ]


_CRITICAL_LEFT_OUT = (  # the critical table's columns that summary.json does not repeat
    "frac_sets_beaten_ci_low",
    "frac_sets_beaten_ci_high",
    "null",
    "p_sets",
    "p_images",
    "effect_size",
    "n_units",
    "timesteps",
    "q_floor",
    "critical",
)
_CRITICAL_FIELDS = [c for c in CRITICAL_COLUMNS if c not in _CRITICAL_LEFT_OUT]


def _critical_summary(critical: pd.DataFrame) -> dict:
    """Critical components and, per level/method family, how many were tested and how low q could go."""
    hits = critical[critical.critical].sort_values("excess_pct", ascending=False)
    families = critical.groupby(["level", "method"])
    out = {
        "critical": [
            {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}
            for row in hits[[c for c in _CRITICAL_FIELDS if c in hits]].to_dict("records")
        ],
        "n_critical": {f"{lv}/{m}": int(g.critical.sum()) for (lv, m), g in families},
        "n_tested": {f"{lv}/{m}": int(len(g)) for (lv, m), g in families},
    }
    if (
        "n_units" in critical
    ):  # the test's unit: an image of either dataset (both datasets' images pooled)
        out["n_units"] = {f"{lv}/{m}": int(g.n_units.max()) for (lv, m), g in families}
    if "q_floor" in critical:  # tables of older runs lack it
        out["q_floor"] = {f"{lv}/{m}": float(g.q_floor.iloc[0]) for (lv, m), g in families}
        out["lone_critical_possible"] = {k: q < 0.05 for k, q in out["q_floor"].items()}
        out["null_sets"] = {f"{lv}/{m}": int(g.n_null_sets.iloc[0]) for (lv, m), g in families}
        out["aliases"] = {
            r.target: r.also_named.split(",")
            for r in critical.drop_duplicates("target").itertuples()
            if r.also_named
        }
        out["test"] = (
            "one-sided: rank of the component's mean degradation among the null sets (random head sets of "
            "its size; for a head, the other heads) and a sign-flip test over images of its excess over their "
            "mean, p = the larger; corrected within level x method; critical = q < 0.05. q_floor: the q of a "
            "component alone at the p floor (below 0.05: a lone component can be critical); single heads, "
            "ranked among the other heads, never can (q >= 1 by construction)."
        )
    return out


def _pairs(frame: pd.DataFrame) -> list[tuple[str, int]]:
    """The (dataset, timestep) pairs of ``frame``, sorted."""
    pairs = frame[["dataset", "timestep"]].drop_duplicates()
    return sorted(zip(pairs.dataset, pairs.timestep.astype(int)))


def _ablation(
    ablations: pd.DataFrame,
    critical: pd.DataFrame | None,
    seed: int,
    informative: frozenset[tuple[str, int]] | None = None,
    top: int = 5,
) -> dict:
    """Degradation range per level and method, the largest effects, and the critical components, at informative
    (dataset, timestep) pairs only (``excluded`` lists the others that were ablated).

    A target's degradation is its mean over images, datasets and timesteps; CIs resample images
    (each image's degradation averaged over its timesteps first). ``critical``: components more harmful than
    the random-set distribution of their size (``protocol.analyses.critical_table``).
    """
    named = ablations[ablations.level != "random"]
    pairs = _pairs(named)
    ablations = informative_rows(named, informative)
    used = _pairs(ablations)
    per_target = (
        ablations.groupby(["level", "method", "target"], sort=False)["degradation_pct"]
        .mean()
        .reset_index()
    )
    ranges = {}
    for (level, method), g in per_target.groupby(["level", "method"], sort=False):
        ranges.setdefault(level, {})[method] = [
            float(g.degradation_pct.min()),
            float(g.degradation_pct.max()),
        ]
    largest = []
    chosen = {
        (level, method, target)
        for (level, method), g in per_target.groupby(["level", "method"], sort=False)
        for target in g.nlargest(top if level == "head" else 1, "degradation_pct").target
    }
    keys = pd.MultiIndex.from_arrays([ablations.level, ablations.method, ablations.target])
    by_target = ablations[keys.isin(list(chosen))].groupby(
        ["level", "method", "target"], sort=False
    )
    for (level, method), g in per_target.groupby(["level", "method"], sort=False):
        for target in g.nlargest(top if level == "head" else 1, "degradation_pct").target:
            rows = by_target.get_group((level, method, target))
            per_image = rows.groupby(["dataset", "image"])["degradation_pct"].mean().to_numpy()
            x0 = rows.x0_mse_intervened.mean() / rows.x0_mse_clean.mean()
            largest.append(
                {
                    "level": level,
                    "method": method,
                    "target": target,
                    "degradation_pct": _ci_entry(per_image, seed),
                    "x0_mse_ratio": float(x0),
                }
            )
    out = {
        "methods": sorted(named.method.unique()),
        "n_images": int(named.groupby("dataset").image.nunique().max()),
        "timesteps_used": [{"dataset": d, "timestep": t} for d, t in used],
        "excluded": [
            {
                "dataset": d,
                "timestep": t,
                "reason": "uninformative: the model does not beat the trivial predictor there",
            }
            for d, t in pairs
            if (d, t) not in used
        ],
        "degradation_range_pct": ranges,
        "largest": largest,
    }
    if critical is not None:
        out |= _critical_summary(critical)
    return out


MIN_SPLIT_PAIRS = (
    8  # fewer pairs: the top components are chosen and measured on the same pairs, and labelled so
)


def _patching(
    patching: pd.DataFrame,
    manifest: dict,
    seed: int,
    top: int = 5,
    informative: frozenset[tuple[str, int]] | None = None,
) -> dict:
    """The components whose activation, patched from b into a, moves a's output furthest toward b's, at the
    receiver's informative timesteps. Choosing the largest and measuring them on the same pairs overstates them
    (winner's curse: with no real effect, half of such top-5 intervals miss 0); so, from ``MIN_SPLIT_PAIRS`` pairs
    on, the components are chosen on a random half of the pairs and their moved fraction and CI are measured on
    the other half."""
    receiver = frozenset((d, t) for d, t in informative or () if d == "a")
    rows = (
        patching
        if informative is None
        else patching[patching.timestep.isin({t for _, t in receiver})]
    )
    pairs = np.sort(rows.pair.unique())
    split = len(pairs) >= MIN_SPLIT_PAIRS
    chosen_on = set(
        np.random.default_rng([seed, 1]).permutation(pairs)[: len(pairs) // 2] if split else pairs
    )
    choose, measure = (
        rows[rows.pair.isin(chosen_on)],
        rows[~rows.pair.isin(chosen_on)] if split else rows,
    )
    per_target = choose.groupby(["level", "target"], sort=False)["moved_frac"].mean().reset_index()
    best = []
    for level, g in per_target.groupby("level", sort=False):
        for target in g.nlargest(top, "moved_frac").target:
            per_pair = (
                measure[measure.target == target].groupby("pair")["moved_frac"].mean().to_numpy()
            )
            best.append({"level": level, "target": target, "moved_frac": _ci_entry(per_pair, seed)})
    return {
        "source": manifest["datasets"]["b"]["spec"],
        "receiver": manifest["datasets"]["a"]["spec"],
        "n_pairs": int(patching.pair.nunique()),
        "timesteps": sorted(int(t) for t in rows.timestep.unique()),
        "selection": (
            "no informative timestep of the receiver: nothing chosen"
            if not len(pairs)
            else f"the top {top} per level chosen on {len(chosen_on)} random pairs, their moved fraction and 95 % CI "
            f"measured on the other {len(pairs) - len(chosen_on)} (no selection bias)"
            if split
            else f"the top {top} per level chosen and measured on the same {len(pairs)} pairs (fewer than "
            f"{MIN_SPLIT_PAIRS} to split): the values and CIs are post-selection, optimistic"
        ),
        "largest": best,
    }


def _per_head_matrix(frame: pd.DataFrame) -> pd.DataFrame:
    """[images x heads] of degradation_pct (images: dataset, image)."""
    return frame.pivot_table(
        index="image", columns="target", values="degradation_pct", aggfunc="mean"
    )


def _attribution(
    attribution: pd.DataFrame,
    ablations: pd.DataFrame,
    seed: int = 0,
    informative: frozenset[tuple[str, int]] | None = None,
) -> list[dict]:
    """Each estimator against the exhaustive ablation it estimates, per method, dataset and timestep.

    Single-head estimators (first order, +Gauss-Newton, per-head IG): Spearman ρ over heads between the
    estimated and the exhaustive single-head degradation (means over images). Joint IG: its per-head scores
    split the all-heads ablation, so its per-image total is compared with the exhaustive all-heads ablation
    (ρ over images), and its head ranking against single heads is kept as ``ranking_vs_single_head``.
    Every ρ has a percentile-bootstrap 95 % CI over images (``n_resamples`` resamples).
    """
    heads = ablations[ablations.level == "head"]
    joint = ablations[ablations.level == "all"]
    est = attribution.assign(target=attribution.layer + ":" + attribution["head"].astype(str))
    out = []
    for (estimator, method, dataset, t), g in est.groupby(
        ["estimator", "method", "dataset", "timestep"], sort=True
    ):
        key = (heads.method == method) & (heads.dataset == dataset) & (heads.timestep == t)
        truth = _per_head_matrix(heads[key])
        guess = _per_head_matrix(g).reindex(index=truth.index, columns=truth.columns)
        rho, low, high, n_ok = bootstrap_spearman(
            guess.to_numpy(), truth.to_numpy(), n_resamples=_SPEARMAN_RESAMPLES, seed=seed
        )
        ranking = {
            "spearman": rho,
            "ci_low": low,
            "ci_high": high,
            "n_resamples": n_ok,
            "top5_overlap": len(
                set(truth.mean().nlargest(5).index) & set(guess.mean().nlargest(5).index)
            ),
            "top5_overlap_chance": 25 / truth.shape[1] if truth.shape[1] else float("nan"),
        }
        entry = {
            "estimator": estimator,
            "estimates": ESTIMATES.get(estimator, "single-head ablation"),
            "method": method,
            "dataset": dataset,
            "timestep": int(t),
            "informative": informative is None or (dataset, int(t)) in informative,
            "interval": "percentile bootstrap over images",
        }
        if estimator != "ig_joint":
            out.append(
                entry
                | {"compared_with": "exhaustive single-head ablation", "spearman_over": "heads"}
                | ranking
            )
            continue
        rows = joint[
            (joint.method == method) & (joint.dataset == dataset) & (joint.timestep == t)
        ].set_index("image")
        if (
            rows.empty
        ):  # a run without the all-heads target: only the (mismatched) single-head ranking
            out.append(entry | {"compared_with": None, "ranking_vs_single_head": ranking})
            continue
        predicted = (
            100 * g.groupby("image").delta_mse.sum().reindex(rows.index) / rows.mse_clean
        ).to_numpy()
        measured = rows.degradation_pct.to_numpy()
        rho, low, high, n_ok = paired_spearman_ci(
            predicted, measured, n_resamples=_SPEARMAN_RESAMPLES, seed=seed
        )
        out.append(
            entry
            | {
                "compared_with": "exhaustive all-heads ablation",
                "spearman_over": "images",
                "spearman": rho,
                "ci_low": low,
                "ci_high": high,
                "n_resamples": n_ok,
                "predicted_pct": _ci_entry(predicted, seed),
                "measured_pct": _ci_entry(measured, seed),
                "ranking_vs_single_head": ranking,
            }
        )
    return out


def _clean(value):
    """A table cell as JSON: NaN, ±inf and NA become null, numpy scalars Python ones."""
    if value is None or value is pd.NA:
        return None
    if hasattr(value, "item"):
        value = value.item()
    return None if isinstance(value, float) and not np.isfinite(value) else value


def _records(frame: pd.DataFrame) -> list[dict]:
    return [{k: _clean(v) for k, v in row.items()} for row in frame.to_dict("records")]


_RATIO_KEYS = (
    "timestep",
    "value",
    "ci_low",
    "ci_high",
    "ci_withheld",
    "p_value",
    "p_floor",
    "can_reject",
    "mde_ratio",
    "underpowered",
    "n_a",
    "n_b",
    "noise_a",
    "noise_b",
)


def _complexity(complexity: pd.DataFrame) -> tuple[dict, list[dict]]:
    """The primary measure per timestep (and pooled, labelled), or a labelled stand-in when ablation was not run."""
    rows = _records(complexity)
    primary = [r for r in rows if r["primary"]]
    chosen = primary or [r for r in rows if r["measure"] == rows[0]["measure"]]
    headline = {
        "measure": chosen[0]["measure"],
        "stand_in_for": None if primary else PRIMARY_COMPLEXITY,
        "paper_ratio": PAPER_COMPLEXITY_RATIO,
        "per_timestep": [
            {k: r.get(k) for k in _RATIO_KEYS} for r in chosen if r["scope"] == "timestep"
        ],  # .get: the noise columns are new; older tables lack them
        "pooled": next(
            (
                {k: r.get(k) for k in _RATIO_KEYS if k != "timestep"}
                for r in chosen
                if r["scope"] == "pooled_over_timesteps"
            ),
            None,
        ),
    }
    if not primary:
        headline["note"] = (
            f"{headline['measure']} stands in for {PRIMARY_COMPLEXITY}, which needs single-head "
            "ablations (not run); it is not the paper's measure"
        )
    return headline, rows


def _divergence(
    divergence: pd.DataFrame, heads: pd.DataFrame | None, top: int = 5
) -> tuple[list[dict], list[dict]]:
    """Per timestep: the divergence table's row; and the heads that differ most (q < 0.05), with their CIs."""
    rows = _records(divergence.sort_values("timestep"))
    if heads is None:
        return rows, []
    out = []
    for t, g in heads.groupby("timestep", sort=True):
        hits = g[g.differs]
        hits = hits.loc[hits.diff_nats.abs().nlargest(top).index]
        out.append(
            {
                "timestep": int(t),
                "n_heads": int(len(g)),
                "n_heads_differ": int(g.differs.sum()),
                "can_reject": bool(g.can_reject.all()),
                "largest": _records(
                    hits[
                        [
                            "layer",
                            "head",
                            "diff_nats",
                            "ci_low_nats",
                            "ci_high_nats",
                            "diff_norm",
                            "q_value",
                            "cohens_d",
                        ]
                    ]
                ),
            }
        )
    return rows, out


def _attach_family_q(
    headline: dict | None, divergence_rows: list[dict], tests: pd.DataFrame | None
) -> None:
    """Give each headline ratio and mean-divergence row the p corrected within its family of the tests table
    (``q_value``, ``family``) and whether a lone effect in that family could reach q < 0.05 (``can_reject``)."""
    if tests is None or not len(tests):
        return
    by_what = {r.what: r for r in tests.itertuples()}

    def attach(row: dict, what: str) -> None:
        found = by_what.get(what)
        if found is not None:
            row["q_value"], row["family"] = _clean(found.p_corrected), found.family
            row["can_reject"] = bool(row.get("can_reject", True)) and bool(found.can_reject)

    for row in divergence_rows:
        attach(row, mean_divergence_test(int(row["timestep"])))
    if headline is not None:
        for row in headline["per_timestep"]:
            attach(row, complexity_test(headline["measure"], int(row["timestep"])))
        if headline["pooled"] is not None:
            attach(headline["pooled"], complexity_test(headline["measure"]))


def _tests(tests: pd.DataFrame) -> dict:
    """Tests per family and how many survive correction, counted in the direction the family tests: a one-sided
    family's p already is; a two-sided family's significant tests are split by the sign of their statistic."""
    families = {}
    for family, g in tests.groupby("family", sort=False):
        sides = g["alternative"] if "alternative" in g else pd.Series("two-sided", index=g.index)
        sig = g.p_corrected < 0.05
        entry = {
            "n_tests": int(len(g)),
            "alternative": ",".join(sorted(sides.unique())),
            "significant_bh_0.05": int(sig.sum()),
        }
        two = sig & (sides == "two-sided")
        if two.any() or (sides == "two-sided").all():
            entry["significant_increase"] = int((two & (g.statistic > 0)).sum())
            entry["significant_decrease"] = int((two & (g.statistic < 0)).sum())
        if "can_reject" in g:
            entry["n_cannot_reject"] = int((~g.can_reject.astype(bool)).sum())
        families[family] = entry
    return {
        "n_tests": int(len(tests)),
        "correction": "within each family (see the run's config: fdr_bh or holm)",
        "counting": "one-sided families count only their tested direction (their p is one-sided); two-sided "
        "families also give significant increases and decreases separately",
        "families": families,
    }


def _seed_variance(table: pd.DataFrame) -> list[dict]:
    out = []
    for (quantity, dataset, t), g in table.groupby(["quantity", "dataset", "timestep"], sort=True):
        v = g.value.to_numpy()
        out.append(
            {
                "quantity": quantity,
                "dataset": dataset,
                "timestep": int(t),
                "seeds": [int(x) for x in g.seed],
                "mean": float(v.mean()),
                "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                "min": float(v.min()),
                "max": float(v.max()),
            }
        )
    return out


def _datasets(manifest: dict, table: pd.DataFrame | None) -> tuple[dict, list[dict] | None]:
    """The manifest's datasets, each with its image properties (mean, CI, SD over images) from
    ``tables/datasets.parquet``; and per property the standardised difference b − a with its CI and p."""
    datasets = {k: dict(v) for k, v in manifest["datasets"].items()}
    if table is None:
        return datasets, None
    for key in datasets:
        datasets[key]["properties"] = {
            r["property"]: {
                "mean": r[f"mean_{key}"],
                "ci_low": r[f"ci_low_{key}"],
                "ci_high": r[f"ci_high_{key}"],
                "sd": r[f"sd_{key}"],
            }
            for r in table.to_dict("records")
        }
    fields = (
        "property",
        "definition",
        "difference",
        "cohens_d",
        "d_ci_low",
        "d_ci_high",
        "p_value",
        "p_floor",
        "p_corrected",
        "differs",
        "n_a",
        "n_b",
    )
    differences = [
        {k: (None if isinstance(r[k], float) and r[k] != r[k] else r[k]) for k in fields}
        for r in table.to_dict("records")
    ]
    for d in differences:
        d["differs"], d["n_a"], d["n_b"] = bool(d["differs"]), int(d["n_a"]), int(d["n_b"])
    return datasets, differences


def _circuits(found: list[CircuitRecord]) -> dict:
    """Per dataset and window: the gap test, the claim, and for claimed circuits their size (with the
    bootstrap range or interval), faithfulness (in-sample, and out of bag), recovered_without_circuit, necessary
    heads and overlap;
    per window with two claimed circuits: their sizes at matched faithfulness and the ratio b/a."""
    out: dict = {
        "tau": None,
        "method": None,
        "metric": None,
        "ranking": None,
        "windows": [],
        "complexity": [],
    }
    for c in found:
        out["tau"], out["method"], out["ranking"], out["metric"] = (
            c.tau,
            c.method,
            c.ranking,
            c.metric,
        )
        record = c.to_dict()
        entry = {k: record[k] for k in _CIRCUIT_KEYS}
        overlap = c.overlap_with_other or {}
        entry["overlap_with_other"] = {k: v for k, v in overlap.items() if k in _OVERLAP_KEYS}
        entry["unique"] = overlap.get("only_a" if c.dataset == "a" else "only_b", [])
        out["windows"].append(entry)
        if c.dataset == "a" and c.complexity:
            out["complexity"].append({"window": c.window, "timesteps": c.timesteps, **c.complexity})
    return out


_CIRCUIT_KEYS = tuple(  # a circuit record's keys that summary.json's circuits.windows repeat
    "dataset window timesteps method claimed claim gap loss_full loss_empty loss_circuit size "
    "size_range size_ci size_interval resamples faithfulness out_of_bag recovered_without_circuit "
    "n_necessary necessary topk_size".split()
)
_OVERLAP_KEYS = ("jaccard", "range_low", "range_high", "ci_low", "ci_high", "resamples", "interval")


def build_summary(
    *,
    manifest: dict,
    heads: pd.DataFrame,
    images: pd.DataFrame,
    roles: pd.DataFrame,
    divergence: pd.DataFrame,
    ablations: pd.DataFrame | None = None,
    patching: pd.DataFrame | None = None,
    attribution: pd.DataFrame | None = None,
    complexity: pd.DataFrame | None = None,
    tests: pd.DataFrame | None = None,
    critical: pd.DataFrame | None = None,
    seed_variance: pd.DataFrame | None = None,
    circuits: list[CircuitRecord] | None = None,
    datasets: pd.DataFrame | None = None,
    divergence_heads: pd.DataFrame | None = None,
) -> Summary:
    """The headline of a run: what is known so far, with CIs (``summary.to_dict()`` is summary.json)."""
    seed = int(manifest["config"]["seed"])
    correction = manifest["config"].get("correction", "fdr_bh")
    denoising = _denoising(images, seed, correction)
    informative = frozenset((d["dataset"], d["timestep"]) for d in denoising if d["informative"])
    done = {
        "ablation": ablations is not None,
        "patching": patching is not None,
        "attribution": attribution is not None and ablations is not None,
        "complexity_ratio": complexity is not None and bool(complexity.primary.any()),
        "random_head_null": critical is not None,
        "seed_variance": seed_variance is not None,
        "circuits": bool(circuits),
    }
    headline, measures = (
        _complexity(complexity) if complexity is not None and len(complexity) else (None, [])
    )
    divergence_rows, differing = _divergence(divergence, divergence_heads)
    _attach_family_q(headline, divergence_rows, tests)
    pending = [p for p in PENDING_ANALYSES if not done.get(p)]
    described, differences = _datasets(manifest, datasets)
    summary = Summary(
        model=manifest["model"],
        seed=seed,
        datasets=described,
        dataset_differences=differences,  # per image property: b − a, Cohen's d with CI, p, BH q (datasets.parquet)
        mean_reference=manifest["config"].get(
            "mean_reference", "insample"
        ),  # mean ablation's reference images
        timesteps=manifest["config"]["timesteps"],
        denoising=denoising,
        uninformative=[
            {
                "dataset": d["dataset"],
                "timestep": d["timestep"],
                "ratio_to_trivial": d["ratio_to_trivial"],
                "p_corrected": d["p_corrected"],
            }
            for d in denoising
            if not d["informative"]
        ],
        entropy=_entropy(heads, seed),
        entropy_by_layer=_entropy_by_layer(heads),
        roles=_roles(heads, roles, seed),
        role_evidence=_role_evidence(roles),
        role_differences=_role_differences(roles),
        entropy_divergence=divergence_rows,
        entropy_difference_heads=differing,
        ablation=_ablation(ablations, critical, seed, informative)
        if ablations is not None
        else None,
        patching=(
            _patching(patching, manifest, seed, informative=informative)
            if patching is not None
            else None
        ),
        attribution=_attribution(attribution, ablations, seed, informative)
        if done["attribution"]
        else None,
        complexity_ratio=headline,
        complexity_measures=measures,
        tests=_tests(tests) if tests is not None else None,
        seed_variance=_seed_variance(seed_variance) if seed_variance is not None else None,
        circuits=_circuits(circuits) if circuits else None,
        pending=pending,
    )
    summary = replace(summary, paper_comparison=paper_comparison(summary))
    return replace(summary, validity=validity(summary, manifest))
