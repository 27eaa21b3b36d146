"""Derived tables, computed from ``head_metrics`` alone (so a report can be rebuilt from tables).

- ``head_summary``: per dataset x timestep x head x metric, the mean over images with a 95 %
  percentile-bootstrap CI (images resampled, one bootstrap per dataset and timestep for all heads);
- ``role_tests`` / ``head_roles``: each content probe of each head against its null, and each head's role
  per dataset and timestep (``protocol.roles``, ``metrics.roles``);
- ``divergence_heads``: per timestep x head, the entropy difference b − a (nats and normalised) with
  a bootstrap CI over images, permutation p and BH q over the heads of the timestep; its
  Wasserstein-1 divergence against the permutation null; the legacy 10-bin JSD (``stats.divergence``);
- ``divergence``: per timestep, the same averaged over heads (each with CI / null and p), and how many
  heads differ (q < 0.05);
- ``complexity``: each complexity measure per dataset and the b/a ratio with CI, p-value and the
  smallest detectable ratio (``stats.complexity``), per timestep and, labelled ``scope =
  "pooled_over_timesteps"``, pooled; the primary measure is the participation ratio of single-head
  mean-ablation effects — causal, and the effective number of heads that matter;
- ``denoising_tests``: per dataset x timestep, whether the model beats the trivial predictor (paired,
  one-sided, corrected over the family); ``informative_timesteps`` is the set of pairs where it does;
- ``critical``: every distinct head, layer and block ablation against the distribution of random head
  sets of its size (rank among them and a sign-flip test over images), at informative timesteps
  (``protocol.critical``);
- ``tests``: every hypothesis test performed, with p, corrected p within its family
  (Benjamini–Hochberg by default, Holm with ``correction="holm"``), effect size and n.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from diffcircuit.metrics.attention import HEAD_METRICS
from diffcircuit.protocol._resampling import N_RESAMPLES
from diffcircuit.protocol.critical import critical_table
from diffcircuit.protocol.roles import (
    coded,
    frame_groups,
    head_roles_table,
    pivot_means,
    role_tests_table,
)
from diffcircuit.stats.bootstrap import column_mean_cis, mean_ci
from diffcircuit.stats.complexity import (
    heads_for_fraction,
    mean_value,
    participation_ratio,
    ratio_test,
)
from diffcircuit.stats.divergence import (
    head_jsd,
    mean_difference_tests,
    wasserstein_per_head,
    wasserstein_test,
)
from diffcircuit.stats.tests import (
    cohens_d,
    correct_pvalues,
    paired_test,
    paired_tests,
)

__all__ = [
    "ALPHA",
    "PAPER_COMPLEXITY_RATIO",
    "PRIMARY_COMPLEXITY",
    "SUMMARY_METRICS",
    "complexity_table",
    "denoising_tests",
    "derived_tables",
    "divergence_tables",
    "guidance_table",
    "head_summary_table",
    "informative_timesteps",
    "mean_divergence_test",
    "complexity_test",
    "seed_quantities",
    "tests_table",
]

PRIMARY_COMPLEXITY = "ablation_participation_ratio"
PAPER_COMPLEXITY_RATIO = (
    1.084  # arXiv 2506.17237's abstract; only compared with each ratio's detectable size
)
ALPHA = 0.05

SUMMARY_METRICS = ("entropy_nats", "entropy_norm", *HEAD_METRICS)


def head_summary_table(heads: pd.DataFrame, *, seed: int = 0) -> pd.DataFrame:
    """Long table: dataset, timestep, layer, head, metric, mean, ci_low, ci_high, n_images (the interval: the
    percentile interval of 1,000 bootstrap resamples of the images, every head and metric on the same ones)."""
    frames = []
    for (dataset, t), g in frame_groups(
        heads, ["dataset", "timestep"], ["image", "layer", "head", *SUMMARY_METRICS]
    ):
        wide, images, cols = pivot_means(g, ["image"], ["layer", "head"], list(SUMMARY_METRICS))
        mean, low, high = column_mean_cis(wide, seed=seed)
        metrics = np.repeat(
            sorted(SUMMARY_METRICS), len(cols)
        )  # pivot_means: values sorted, outermost
        frames.append(
            pd.concat([cols] * len(SUMMARY_METRICS), ignore_index=True).assign(
                metric=metrics,
                dataset=dataset,
                timestep=int(t),
                mean=mean,
                ci_low=low,
                ci_high=high,
                n_images=len(images),
            )
        )
    order = [
        "dataset",
        "timestep",
        "layer",
        "head",
        "metric",
        "mean",
        "ci_low",
        "ci_high",
        "n_images",
    ]
    return pd.concat(frames, ignore_index=True)[order]


def _entropy_wide(
    g: pd.DataFrame, values: list[str]
) -> tuple[list[np.ndarray], list[np.ndarray], pd.DataFrame]:
    """One timestep's rows -> per value a [n_a, H] and b [n_b, H] (images sorted) and the (layer, head) of each column."""
    wide, keys, cols = pivot_means(g, ["dataset", "image"], ["layer", "head"], values)
    a, b = wide[(keys.dataset == "a").to_numpy()], wide[(keys.dataset == "b").to_numpy()]
    order = np.argsort(np.argsort(values))  # pivot_means sorts the values
    h = len(cols)
    return (
        [a[:, j * h : (j + 1) * h] for j in order],
        [b[:, j * h : (j + 1) * h] for j in order],
        cols,
    )


def _heads_rows(
    t: int, cols: pd.DataFrame, nats, norm, w, a: np.ndarray, b: np.ndarray
) -> pd.DataFrame:
    """divergence_heads rows of one timestep: per head the entropy difference, W1 and legacy JSD."""
    return cols.assign(
        timestep=t,
        n_a=nats.n_a,
        n_b=nats.n_b,
        mean_a_nats=nats.mean_a,
        mean_b_nats=nats.mean_b,
        diff_nats=nats.difference,
        ci_low_nats=nats.ci_low,
        ci_high_nats=nats.ci_high,
        diff_norm=norm.difference,
        ci_low_norm=norm.ci_low,
        ci_high_norm=norm.ci_high,
        ci_withheld=nats.ci_withheld,
        p_value=nats.p_value,
        q_value=nats.q_value,
        differs=nats.q_value < ALPHA,
        p_floor=nats.p_floor,
        n_permutations=nats.n_permutations,
        can_reject=nats.can_reject,
        cohens_d=[cohens_d(b[:, h], a[:, h]) for h in range(a.shape[1])],
        wasserstein_nats=w.per_head,
        wasserstein_excess_nats=w.per_head - w.per_head_null_mean,
        wasserstein_p=w.per_head_p,
        wasserstein_q=w.per_head_q,
        wasserstein_can_reject=w.heads_can_reject,
        legacy_jsd_bits_10bins=head_jsd(a, b),
    )[["timestep", "layer", "head", *_HEAD_COLUMNS]]


_HEAD_COLUMNS = (
    "n_a",
    "n_b",
    "mean_a_nats",
    "mean_b_nats",
    "diff_nats",
    "ci_low_nats",
    "ci_high_nats",
    "diff_norm",
    "ci_low_norm",
    "ci_high_norm",
    "ci_withheld",
    "p_value",
    "q_value",
    "differs",
    "p_floor",
    "n_permutations",
    "can_reject",
    "cohens_d",
    "wasserstein_nats",
    "wasserstein_excess_nats",
    "wasserstein_p",
    "wasserstein_q",
    "wasserstein_can_reject",
    "legacy_jsd_bits_10bins",
)


def _timestep_row(t: int, nats, norm, mean_nats, mean_norm, w, legacy) -> dict:
    """The divergence row of one timestep: means over heads, each with its interval or null."""
    scalar = lambda x: float(np.asarray(x).ravel()[0])  # noqa: E731  (one-column MeanDifference)
    return {
        "timestep": t,
        "n_a": nats.n_a,
        "n_b": nats.n_b,
        "n_heads": len(nats.difference),
        "entropy_diff_nats": scalar(mean_nats.difference),
        "ci_low_nats": scalar(mean_nats.ci_low),
        "ci_high_nats": scalar(mean_nats.ci_high),
        "p_value": scalar(mean_nats.p_value),
        "entropy_diff_norm": scalar(mean_norm.difference),
        "ci_low_norm": scalar(mean_norm.ci_low),
        "ci_high_norm": scalar(mean_norm.ci_high),
        "p_value_norm": scalar(mean_norm.p_value),
        "ci_withheld": mean_nats.ci_withheld,
        "p_floor": mean_nats.p_floor,
        "can_reject": mean_nats.can_reject,
        "n_resamples": mean_nats.n_resamples,
        "n_permutations": mean_nats.n_permutations,
        "n_heads_differ": int((nats.q_value < ALPHA).sum()),
        "heads_can_reject": nats.can_reject,
        "wasserstein_nats": w.value,
        "wasserstein_null_mean_nats": w.null_mean,
        "wasserstein_excess_nats": w.excess,
        "wasserstein_null_critical_nats": w.null_critical,
        "wasserstein_p": w.p_value,
        "wasserstein_p_floor": w.p_floor,
        "wasserstein_can_reject": w.can_reject,
        "wasserstein_n_permutations": w.n_permutations,
        "legacy_jsd_bits_10bins": float(legacy.mean()),
    }


def divergence_tables(
    heads: pd.DataFrame, *, seed: int = 0, correction: str = "fdr_bh"
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per timestep and per timestep x head: how the two datasets' head entropies differ (``stats.divergence``);
    a head "differs" where its q, corrected over the timestep's heads by ``correction``, is below α."""
    rows, per_head = [], []
    for (t,), g in frame_groups(
        heads, ["timestep"], ["dataset", "image", "layer", "head", "entropy_nats", "entropy_norm"]
    ):
        (a, a_norm), (b, b_norm), cols = _entropy_wide(g, ["entropy_nats", "entropy_norm"])
        # per head, and each image's mean over heads: one bootstrap and one permutation matrix product
        blocks = [
            np.column_stack([x, y, x.mean(1), y.mean(1)]) for x, y in ((a, a_norm), (b, b_norm))
        ]
        nats, norm, mean_nats, mean_norm = mean_difference_tests(
            *blocks, [a.shape[1], a.shape[1], 1, 1], seed=seed, correction=correction
        )
        w = wasserstein_test(a, b, alpha=ALPHA, seed=seed, correction=correction)
        per_head.append(_heads_rows(int(t), cols, nats, norm, w, a, b))
        rows.append(
            _timestep_row(
                int(t), nats, norm, mean_nats, mean_norm, w, per_head[-1].legacy_jsd_bits_10bins
            )
        )
    return pd.DataFrame(rows), pd.concat(per_head, ignore_index=True)


def _per_image(frame: pd.DataFrame, columns: list[str], value: str) -> dict[str, np.ndarray]:
    """dataset -> [images x columns] of ``value`` averaged over the frame's timesteps (one row per image); columns
    without a finite value are left out (``pivot_table``'s dropna)."""
    wide, keys, _ = pivot_means(frame, ["dataset", "image"], columns, [value])
    wide = wide[:, np.isfinite(wide).any(0)]
    return {d: wide[(keys.dataset == d).to_numpy()] for d in ("a", "b")}


def _ablation_method(ablations: pd.DataFrame) -> str:
    methods = set(ablations.method.unique())
    return "mean" if "mean" in methods else sorted(methods)[0]


def _complexity_plans(
    heads: pd.DataFrame, ablations: pd.DataFrame | None
) -> list[tuple[str, pd.DataFrame, list, object]]:
    """(measure, rows, columns that identify a head, measure function): the ablation measures first."""
    plans = []
    if ablations is not None:
        keep = (ablations.level == "head") & (ablations.method == _ablation_method(ablations))
        single = ablations.loc[keep, ["dataset", "image", "timestep", "target", "degradation_pct"]]
        plans += [
            (PRIMARY_COMPLEXITY, single, ["target"], participation_ratio),
            ("ablation_heads_for_90pct", single, ["target"], heads_for_fraction),
        ]
    return plans + [
        ("mean_entropy_norm", heads, ["layer", "head"], mean_value),
        ("mean_effective_keys_frac", heads, ["layer", "head"], mean_value),
    ]


_VALUE = {
    PRIMARY_COMPLEXITY: "degradation_pct",
    "ablation_heads_for_90pct": "degradation_pct",
    "mean_entropy_norm": "entropy_norm",
    "mean_effective_keys_frac": "effective_keys_frac",
}


def complexity_table(
    heads: pd.DataFrame, ablations: pd.DataFrame | None, *, seed: int = 0
) -> pd.DataFrame:
    """Per complexity measure and timestep (and pooled over timesteps, labelled so): the value on a and b,
    the ratio b/a with its CI, permutation p, the smallest ratio this run could detect, and its flags."""
    rows = []
    for name, frame, columns, measure in _complexity_plans(heads, ablations):
        frame = coded(frame[["dataset", "image", "timestep", *columns, _VALUE[name]]])
        scopes = [("timestep", int(t), g) for (t,), g in frame_groups(frame, ["timestep"])]
        for scope, t, g in scopes + [("pooled_over_timesteps", pd.NA, frame)]:
            per_image = _per_image(g, columns, _VALUE[name])
            res = ratio_test(per_image["a"], per_image["b"], measure, alpha=ALPHA, seed=seed)
            rows.append(
                {
                    "measure": name,
                    "primary": name == PRIMARY_COMPLEXITY,
                    "scope": scope,
                    "timestep": t,
                    **res.to_dict(),
                    "underpowered": not res.mde_ratio <= PAPER_COMPLEXITY_RATIO,
                }
            )
    frame = pd.DataFrame(rows)
    frame["timestep"] = frame.timestep.astype("Int64")
    return frame


def _paired_by_group(
    frame: pd.DataFrame,
    keys: list[str],
    after: str,
    before: str,
    *,
    alternative: str,
    n_resamples: int,
    seed: int,
) -> list[tuple[tuple, object]]:
    """(group key, ``paired_test`` of ``after`` vs ``before`` over its images) for each group of ``keys`` (which
    hold the dataset), in order of first appearance; groups measured on the same images share one sign-flip
    matrix product (``stats.tests.paired_tests``)."""
    wide, _, groups = pivot_means(frame, ["dataset", "image"], keys, [after, before], sort=False)
    x = wide.reshape(len(wide), 2, -1)  # [images, (after, before) sorted by name, groups]
    i_after, i_before = (0, 1) if after < before else (1, 0)
    measured = np.isfinite(x).all(1)  # [images, groups]
    patterns, which = np.unique(measured.T, axis=0, return_inverse=True)
    results = [None] * len(groups)
    for p, rows in enumerate(patterns):
        cols = np.flatnonzero(which.ravel() == p)
        found = paired_tests(
            x[rows, i_after][:, cols],
            x[rows, i_before][:, cols],
            alternative=alternative,
            n_resamples=n_resamples,
            seed=seed,
        )
        for c, res in zip(cols, found):
            results[c] = res
    return list(zip(map(tuple, groups.itertuples(index=False)), results))


def denoising_tests(
    denoising: pd.DataFrame,
    *,
    correction: str = "fdr_bh",
    seed: int = 0,
    n_resamples: int = N_RESAMPLES,
) -> pd.DataFrame:
    """Per dataset x timestep: does the model beat the trivial predictor ε̂ = √(1−ᾱ_t)·x_t?

    Paired over images (``tables/denoising.parquet``: one row per dataset x image x timestep): a one-sided
    sign-flip test that eps_mse_trivial − eps_mse > 0 on average, corrected over the run's dataset x timestep
    family (``correction``: Benjamini–Hochberg by default). ``informative`` = corrected p < 0.05; at an
    uninformative timestep the model's ε is no better than a constant rescaling of its input, so effects
    measured there are not the model's computation and leave headline claims."""
    tests = (
        dict(
            _paired_by_group(
                denoising,
                ["dataset", "timestep"],
                "eps_mse_trivial",
                "eps_mse",
                alternative="greater",
                n_resamples=n_resamples,
                seed=seed,
            )
        )
        if len(denoising)
        else {}
    )
    rows = []
    for (dataset, t), g in frame_groups(denoising, ["dataset", "timestep"]):
        res = tests[(dataset, t)]
        rows.append(
            {
                "dataset": dataset,
                "timestep": int(t),
                "n_images": int(len(g)),
                "eps_mse": float(g.eps_mse.mean()),
                "eps_mse_trivial": float(g.eps_mse_trivial.mean()),
                "ratio_to_trivial": float(g.eps_mse.mean() / g.eps_mse_trivial.mean()),
                "frac_images_worse": float((g.eps_mse >= g.eps_mse_trivial).mean()),
                "p_value": res.p_value,
                "p_floor": res.p_floor,
                "effect_size": res.effect_size,
            }
        )
    frame = pd.DataFrame(
        rows,
        columns=[
            "dataset",
            "timestep",
            "n_images",
            "eps_mse",
            "eps_mse_trivial",
            "ratio_to_trivial",
            "frac_images_worse",
            "p_value",
            "p_floor",
            "effect_size",
        ],
    )
    frame["p_corrected"] = (
        correct_pvalues(frame.p_value.to_numpy(), correction) if len(frame) else []
    )
    frame["informative"] = frame.p_corrected < 0.05
    return frame


def informative_timesteps(
    denoising: pd.DataFrame, *, correction: str = "fdr_bh", seed: int = 0
) -> frozenset[tuple[str, int]]:
    """The (dataset, timestep) pairs at which the model significantly beats the trivial predictor
    (``denoising_tests``); headline claims use these only."""
    tests = denoising_tests(denoising, correction=correction, seed=seed)
    return frozenset((str(r.dataset), int(r.timestep)) for r in tests.itertuples() if r.informative)


_TEST_ROW_COLUMNS = (  # the columns of a tests.parquet row built outside _family (beats_trivial, critical)
    "family",
    "what",
    "test",
    "statistic",
    "p_value",
    "p_floor",
    "effect_size",
    "effect_size_kind",
    "n_a",
    "n_b",
    "n_resamples",
    "alternative",
    "p_corrected",
)


def _family(rows: list[dict], family: str, correction: str) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    frame.insert(0, "family", family)
    if "alternative" not in frame:
        frame["alternative"] = "two-sided"
    frame["p_corrected"] = correct_pvalues(frame.p_value.to_numpy(), correction)
    return frame


def _entropy_families(divergence_heads: pd.DataFrame, correction: str) -> list[pd.DataFrame]:
    """One family per timestep (the heads' entropy differences, corrected over that timestep's heads)."""
    out = []
    for t, g in divergence_heads.groupby("timestep", sort=True):
        out.append(
            _family(
                [
                    {
                        "what": f"entropy_nats b − a, t={t}, {r.layer}:{r.head}",
                        "test": "permutation (independent, two-sided)",
                        "statistic": r.diff_nats,
                        "p_value": r.p_value,
                        "p_floor": r.p_floor,
                        "effect_size": r.cohens_d,
                        "effect_size_kind": "cohens_d",
                        "n_a": r.n_a,
                        "n_b": r.n_b,
                        "n_resamples": r.n_permutations,
                    }
                    for r in g.itertuples()
                ],
                f"entropy_difference t={t}",
                correction,
            )
        )
    return out


def mean_divergence_test(timestep) -> str:
    """The ``what`` of the tests-table row that tests the mean entropy difference at ``timestep``."""
    return f"mean over heads of entropy_nats b − a, t={timestep}"


def complexity_test(measure: str, timestep=None) -> str:
    """The ``what`` of the tests-table row of a complexity ratio (``timestep`` None: pooled over timesteps)."""
    return f"complexity ratio b/a: {measure}, " + (
        "pooled over timesteps" if timestep is None else f"t={timestep}"
    )


def _divergence_families(divergence: pd.DataFrame, correction: str) -> list[pd.DataFrame]:
    """Per timestep: the mean over heads of the entropy difference, and the Wasserstein-1 divergence."""
    mean = [
        {
            "what": mean_divergence_test(r.timestep),
            "test": "permutation (independent, two-sided)",
            "statistic": r.entropy_diff_nats,
            "p_value": r.p_value,
            "p_floor": r.p_floor,
            "effect_size": r.entropy_diff_norm,
            "effect_size_kind": "entropy_norm_difference",
            "n_a": r.n_a,
            "n_b": r.n_b,
            "n_resamples": r.n_permutations,
        }
        for r in divergence.itertuples()
    ]
    wass = [
        {
            "what": f"Wasserstein-1 of entropy_nats a vs b, mean over heads, t={r.timestep}",
            "test": "permutation (independent, one-sided: larger than the null)",
            "statistic": r.wasserstein_nats,
            "p_value": r.wasserstein_p,
            "p_floor": r.wasserstein_p_floor,
            "effect_size": r.wasserstein_excess_nats,
            "effect_size_kind": "excess_over_null_nats",
            "n_a": r.n_a,
            "n_b": r.n_b,
            "n_resamples": r.wasserstein_n_permutations,
        }
        for r in divergence.itertuples()
    ]
    return [
        _family(mean, "entropy_difference_mean_over_heads", correction),
        _family(wass, "divergence_wasserstein", correction),
    ]


def _complexity_family(complexity: pd.DataFrame, correction: str) -> pd.DataFrame:
    rows = [
        {
            "what": complexity_test(
                r.measure, None if r.scope == "pooled_over_timesteps" else r.timestep
            ),
            "test": "permutation (labels over images)",
            "statistic": r.value,
            "p_value": r.p_value,
            "p_floor": r.p_floor,
            "effect_size": float(np.log(r.value)) if r.value > 0 else float("nan"),
            "effect_size_kind": "log_ratio",
            "n_a": r.n_a,
            "n_b": r.n_b,
            "n_resamples": r.n_permutations,
        }
        for r in complexity.itertuples()
        if np.isfinite(r.p_value)
    ]
    return _family(rows, "complexity_ratio", correction)


def tests_table(
    heads: pd.DataFrame,
    ablations: pd.DataFrame | None,
    divergence: pd.DataFrame,
    complexity: pd.DataFrame,
    critical: pd.DataFrame | None = None,
    *,
    seed: int = 0,
    correction: str = "fdr_bh",
    divergence_heads: pd.DataFrame | None = None,
    beats_trivial: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Every test performed; p corrected (Benjamini–Hochberg by default) within each family. ``beats_trivial``:
    the ``denoising_tests`` table. ``alternative`` says which direction a test tests: a one-sided family's
    significant tests are all in its direction.

    ``can_reject``: whether a lone effect in its family could reach a corrected p below 0.05 at this n and
    number of permutations — family size x smallest attainable p < 0.05 (the first BH / Holm step).
    """
    if divergence_heads is None:
        divergence_heads = divergence_tables(heads, seed=seed, correction=correction)[1]
    families = []
    if beats_trivial is not None and len(beats_trivial):
        d = beats_trivial
        families.append(
            d.assign(
                family="beats_trivial",
                test="permutation (paired sign-flip, one-sided)",
                what="ε-MSE trivial − model > 0, dataset "
                + d.dataset
                + ", t="
                + d.timestep.astype(str),
                statistic=d.eps_mse_trivial - d.eps_mse,
                effect_size_kind="cohens_dz",
                n_a=d.n_images,
                n_b=d.n_images,
                n_resamples=N_RESAMPLES,
                alternative="greater",
            )[list(_TEST_ROW_COLUMNS)]
        )
    families += _entropy_families(divergence_heads, correction)
    if (
        ablations is not None
    ):  # the random sets are the null of the critical family, not claims of their own
        named = ablations[ablations.level != "random"]
        tested = (
            _paired_by_group(
                named,
                ["level", "target", "method", "dataset", "timestep"],
                "mse_intervened",
                "mse_clean",
                alternative="two-sided",
                n_resamples=N_RESAMPLES,
                seed=seed,
            )
            if len(named)
            else []
        )
        paired_rows = [
            {
                "what": f"{method} ablation of {level} {target}, dataset {dataset}, t={t}: ε-MSE ablated vs clean",
                **res.to_dict(),
            }
            for (level, target, method, dataset, t), res in tested
        ]
        families.append(_family(paired_rows, "ablation_paired", correction))
    if critical is not None and len(critical):
        families.append(
            critical.assign(  # one family per level x method, as critical_table corrects them
                family="critical_vs_random_sets " + critical.level + "/" + critical.method,
                test="rank among null sets ∩ sign-flip over images (one-sided)",
                what=critical.method
                + " ablation of "
                + critical.level
                + " "
                + critical.target
                + " vs "
                + critical.null,
                statistic=critical.excess_pct,
                effect_size_kind="cohens_dz",
                n_a=critical.n_units,
                n_b=critical.n_null_sets,
                n_resamples=N_RESAMPLES,
                alternative="greater",
            )[list(_TEST_ROW_COLUMNS)]
        )
    families += [
        *_divergence_families(divergence, correction),
        _complexity_family(complexity, correction),
    ]
    out = pd.concat([f for f in families if not f.empty], ignore_index=True)
    size = out.groupby("family").family.transform("size")
    out["can_reject"] = (size * out.p_floor).clip(upper=1.0) < ALPHA
    return out


def seed_quantities(heads: pd.DataFrame, seed: int) -> pd.DataFrame:
    """Headline quantities of one noise seed (for the spread across seeds): mean normalised entropy per
    dataset and timestep, and per timestep the mean over heads of the entropy difference b − a (nats), of the
    plug-in Wasserstein-1 divergence (nats) and of its excess over the label-permutation null (nats; the
    headline's divergence: the plug-in is > 0 for two samples of one distribution)."""
    rows = [
        {
            "seed": seed,
            "quantity": "mean_entropy_norm",
            "dataset": d,
            "timestep": int(t),
            "value": float(g.entropy_norm.mean()),
        }
        for (d, t), g in heads.groupby(["dataset", "timestep"], sort=True)
    ]
    for (t,), g in frame_groups(
        heads, ["timestep"], ["dataset", "image", "layer", "head", "entropy_nats"]
    ):
        (a,), (b,), _ = _entropy_wide(g, ["entropy_nats"])
        rows += [
            {
                "seed": seed,
                "quantity": "entropy_difference_nats",
                "dataset": "b-a",
                "timestep": int(t),
                "value": float(b.mean(1).mean() - a.mean(1).mean()),
            },
            {
                "seed": seed,
                "quantity": "wasserstein_nats",
                "dataset": "a|b",
                "timestep": int(t),
                "value": float(wasserstein_per_head(a, b).mean()),
            },
            {
                "seed": seed,
                "quantity": "wasserstein_excess_nats",
                "dataset": "a|b",
                "timestep": int(t),
                "value": wasserstein_test(a, b, alpha=ALPHA, seed=seed).excess,
            },
        ]
    return pd.DataFrame(rows)


def derived_tables(
    heads: pd.DataFrame,
    ablations: pd.DataFrame | None = None,
    *,
    seed: int = 0,
    correction: str = "fdr_bh",
    role_permutations: dict[str, pd.DataFrame] | None = None,
    denoising: pd.DataFrame | None = None,
) -> dict[str, pd.DataFrame]:
    """Every table derived from ``head_metrics`` (and ``ablations`` when run), by file stem. ``role_permutations``:
    per dataset, the observation shards' role-null permutation rows (without them no content role is tested);
    with the ``denoising`` table, critical components are tested at informative timesteps only."""
    divergence, divergence_heads = divergence_tables(heads, seed=seed, correction=correction)
    complexity = complexity_table(heads, ablations, seed=seed)
    trivial = (
        None if denoising is None else denoising_tests(denoising, correction=correction, seed=seed)
    )
    informative = (
        None
        if trivial is None
        else frozenset(
            (str(r.dataset), int(r.timestep)) for r in trivial.itertuples() if r.informative
        )
    )
    extra = {} if trivial is None else {"denoising_tests": trivial}
    if ablations is not None:
        extra["critical"] = critical_table(
            ablations, seed=seed, correction=correction, informative=informative
        )
    role_tests = role_tests_table(heads, role_permutations or {}, seed=seed, correction=correction)
    return extra | {
        "head_summary": head_summary_table(heads, seed=seed),
        "role_tests": role_tests,
        "head_roles": head_roles_table(heads, role_tests),
        "divergence": divergence,
        "divergence_heads": divergence_heads,
        "complexity": complexity,
        "tests": tests_table(
            heads,
            ablations,
            divergence,
            complexity,
            extra.get("critical"),
            seed=seed,
            correction=correction,
            divergence_heads=divergence_heads,
            beats_trivial=trivial,
        ),
    }


def guidance_table(
    conditional: pd.DataFrame,
    unconditional: pd.DataFrame,
    *,
    metric: str = "entropy_norm",
    seed: int = 0,
    correction: str = "fdr_bh",
    n_resamples: int = 2000,
) -> pd.DataFrame:
    """What the prompt changes, head by head: per dataset x timestep x head, the paired difference of ``metric``
    between the conditional and the unconditional branch of classifier-free guidance (same images, same noise),
    with a bootstrap CI, a sign-flip permutation p and its correction over all heads of the table."""
    keys = ["dataset", "timestep", "layer", "head", "image"]
    both = conditional[keys + [metric]].merge(
        unconditional[keys + [metric]], on=keys, suffixes=("_cond", "_uncond")
    )
    rows = []
    for (dataset, t, layer, head), g in both.groupby(keys[:4], sort=True):
        a, b = g[f"{metric}_cond"].to_numpy(), g[f"{metric}_uncond"].to_numpy()
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            continue
        res = paired_test(a, b, n_resamples=n_resamples, seed=seed)
        mean, low, high = mean_ci(a - b, seed=seed)
        rows.append(
            {
                "dataset": dataset,
                "timestep": int(t),
                "layer": layer,
                "head": int(head),
                "metric": metric,
                "conditional": float(a.mean()),
                "unconditional": float(b.mean()),
                "difference": mean,
                "ci_low": low,
                "ci_high": high,
                "p_value": res.p_value,
                "p_floor": res.p_floor,
                "effect_size": res.effect_size,
                "n_images": len(a),
            }
        )
    frame = pd.DataFrame(rows)
    frame["p_corrected"] = (
        correct_pvalues(frame.p_value.to_numpy(), correction) if len(frame) else []
    )
    return frame
