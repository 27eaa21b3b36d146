"""The CLI end to end on tiny inputs: outputs, their agreement with a reference, and bad input."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from diffcircuit import probe_registry
from diffcircuit.cli import main
from diffcircuit.metrics.attention import HEAD_METRICS
from diffcircuit.metrics.roles import ROLES


def _run(args, capsys):
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


_ESTIMATES = {
    "": ("mean", "value", "difference", "excess_pct", "jaccard", "diff_nats"),
    "_nats": ("entropy_diff_nats", "diff_nats"),
    "_norm": ("entropy_diff_norm", "diff_norm"),
}


def _assert_intervals_contain_estimates(summary: dict, run_dir) -> None:
    """No interval in summary.json or the run's tables excludes its own estimate (issue 15, section 8)."""

    def pairs(keys):
        for suffix, names in _ESTIMATES.items():
            if {f"ci_low{suffix}", f"ci_high{suffix}"} <= set(keys):
                yield from ((e, f"ci_low{suffix}", f"ci_high{suffix}") for e in names if e in keys)

    def walk(node, where):
        if isinstance(node, dict):
            for est, low, high in pairs(node):
                if node[low] is not None and node[est] is not None:
                    assert node[low] - 1e-9 <= node[est] <= node[high] + 1e-9, (where, est, node)
            for k, v in node.items():
                walk(v, f"{where}.{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{where}[{i}]")

    walk(summary, "summary")
    for path in sorted((run_dir / "tables").glob("*.parquet")):
        table = pd.read_parquet(path)
        for est, low, high in pairs(table.columns):
            t = table.dropna(subset=[low, est])
            assert ((t[low] <= t[est] + 1e-9) & (t[est] <= t[high] + 1e-9)).all(), (path.name, est)


def test_info_json_lists_layers(small_model_dir, capsys):
    code, out, _ = _run(["info", "--model", str(small_model_dir), "--json"], capsys)
    assert code == 0
    info = json.loads(out)
    assert info["model_path"] == str(small_model_dir / "unet")
    assert [(l["heads"], l["head_dim"], l["kind"]) for l in info["layers"]][:2] == [
        (2, 8, "self"),
        (4, 8, "self"),
    ]
    assert set(info["layers"][0]) == {"layer", "heads", "head_dim", "kind", "query_grid", "n_keys"}


@pytest.fixture
def tiny_run(small_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = [
        "run",
        "--out",
        str(out),
        "--model",
        str(small_model_dir),
        "--n",
        "3",
        "--ablate-n",
        "2",  # image 2: mean reference
        "--timesteps",
        "20,800",
        "--batch-size",
        "2",
        "--seed",
        "7",
        "--quiet",
    ]
    code, _, err = _run(args, capsys)
    assert code == 0, err
    return out, args


def test_run_writes_the_run_directory(tiny_run, small_model_dir):
    out, _ = tiny_run
    heads = pd.read_parquet(out / "tables" / "head_metrics.parquet")
    n_heads = (
        2 + 4 + 4 + 4 * 2 + 2 * 2
    )  # down 16x16 (2), down 8x8 (4), mid (4), up 8x8 x2 (4), up 16x16 x2 (2)
    assert len(heads) == 2 * 3 * 2 * n_heads
    assert {
        "dataset",
        "image",
        "timestep",
        "layer",
        "head",
        "entropy_nats",
        "entropy_norm",
        "eps_mse",
    } <= set(heads.columns)
    assert set(heads.dataset) == {"a", "b"}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["seed"] == 7 and manifest["model"]["model_path"] == str(
        small_model_dir / "unet"
    )
    assert manifest["datasets"]["a"]["n"] == 3 and manifest["datasets"]["b"]["spec"] == "faces"
    cost = manifest[
        "cost"
    ]  # observation: one capturing forward per batch of 2 (+ 1) images, per dataset x timestep
    assert (
        cost["observe"]["forward_calls"] == 2 * 2 * 2
        and cost["observe"]["image_forwards"] == 2 * 2 * 3
    )
    assert cost["observe"]["shards"] == 2 * 2 and {"ablate", "discover", "seed 8", "seed 9"} <= set(
        cost
    )
    assert all(
        c["forward_calls"] > 0 and c["seconds"] >= 0
        for label, c in cost.items()
        if "statistics" not in label
    )
    assert cost["statistics (this invocation)"]["forward_calls"] == 0  # statistics run no model
    assert "what this run cost" in (out / "report.html").read_text()
    assert "cost: ablate:" in (out / "run.log").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert {d["timestep"] for d in summary["denoising"]} == {20, 800}
    assert [d["timestep"] for d in summary["entropy_divergence"]] == [20, 800]
    assert {
        "entropy_diff_nats",
        "ci_low_nats",
        "ci_high_nats",
        "p_value",
        "p_floor",
        "can_reject",
        "wasserstein_excess_nats",
        "wasserstein_p",
        "legacy_jsd_bits_10bins",
    } <= set(summary["entropy_divergence"][0])
    first = summary["entropy_divergence"][0]  # 3 images a dataset: 20 splits, no interval, p ≥ 0.1
    assert first["ci_low_nats"] is None and first["ci_withheld"] and not first["can_reject"]
    assert first["p_floor"] == pytest.approx(2 / 20)
    from statsmodels.stats.multitest import (
        multipletests,  # the mean's q: BH across the run's timesteps
    )

    rows = summary["entropy_divergence"]
    np.testing.assert_allclose(
        [r["q_value"] for r in rows],
        multipletests([r["p_value"] for r in rows], method="fdr_bh")[1],
    )
    assert {r["family"] for r in rows} == {"entropy_difference_mean_over_heads"}
    roles = pd.read_parquet(out / "tables" / "head_roles.parquet")
    assert len(roles) == 2 * 2 * n_heads and set(roles.role) <= {
        *ROLES,
        "positional",
        "unassigned",
    }  # per dataset
    tests = pd.read_parquet(out / "tables" / "role_tests.parquet")
    assert set(tests.dataset) == {"a", "b"} and tests.n_permutations.dropna().eq(4999).all()
    listed = sorted(h for r in summary["roles"] for h in r["heads"])
    assert listed == sorted(f"{l}:{h}" for l, h in zip(roles.layer, roles["head"]))
    for metric in HEAD_METRICS:
        assert metric in heads.columns
    ablations = pd.read_parquet(out / "tables" / "ablations.parquet")
    expected_cols = {
        "dataset",
        "timestep",
        "image",
        "level",
        "layer",
        "head",
        "method",
        "mse_clean",
        "mse_intervened",
        "degradation_pct",
        "x0_mse_clean",
        "x0_mse_intervened",
    }
    assert expected_cols <= set(ablations.columns)
    # blocks: down_blocks.0, down_blocks.1 and mid_block hold one layer each (tested once, as the layer), so
    # up_blocks.0 (8 heads) and up_blocks.1 (4 heads) remain; plus all heads at once
    n_layers, n_blocks = 7, 2
    assert set(ablations[ablations.level == "block"].target) == {"up_blocks.0", "up_blocks.1"}
    assert set(ablations[ablations.target == "down_blocks.0.attentions.0"].also_named) == {
        "down_blocks.0"
    }
    # random sets per size: max(100, 20 x 7 layers) for the layer sizes 2 and 4, 100 for the block size 8
    n_random = 140 + 140 + 100
    assert ablations[ablations.level == "random"].groupby("n_heads").target.nunique().to_dict() == {
        2: 140,
        4: 140,
        8: 100,
    }
    assert (
        len(ablations) == (n_heads + n_layers + n_blocks + 1 + n_random) * 2 * 2 * 2 * 2
    )  # targets x methods x datasets x t x images
    # the random-weight model beats the trivial predictor nowhere: no timestep is informative, so no component is
    # tested (critical claims are withheld) and the ablation headline says what it left out
    informative = pd.read_parquet(out / "tables" / "denoising_tests.parquet")
    assert len(informative) == 2 * 2 and not informative.informative.any()
    assert {(d["dataset"], d["timestep"]) for d in summary["uninformative"]} == {
        (d, t) for d in "ab" for t in (20, 800)
    }
    assert (
        len(summary["ablation"]["excluded"]) == 4
        and summary["ablation"]["degradation_range_pct"] == {}
    )
    critical = pd.read_parquet(out / "tables" / "critical.parquet")
    assert critical.empty and summary["ablation"]["n_tested"] == {}
    from diffcircuit.protocol.critical import critical_table

    critical = critical_table(ablations, seed=7)  # every timestep, as if informative
    assert (
        len(critical) == (n_heads + n_layers + n_blocks) * 2
        and critical.p_corrected.between(0, 1).all()
    )
    sets = critical[
        critical.level != "head"
    ]  # floor: the rank among >= 100 sets, or the 2^6 sign flips of 6 images
    np.testing.assert_allclose(
        sets.p_floor, np.maximum(1 / (sets.n_null_sets + 1), 1 / 2**sets.n_units)
    )
    assert (sets.n_null_sets >= 100).all() and (1 / (sets.n_null_sets + 1) < 1 / 11).all()
    np.testing.assert_allclose(
        ablations.degradation_pct,
        100 * (ablations.mse_intervened - ablations.mse_clean) / ablations.mse_clean,
        rtol=1e-6,
    )
    assert set(ablations[ablations.level == "head"].method) == {"zero", "mean"}
    patching = pd.read_parquet(out / "tables" / "patching.parquet")
    assert len(patching) == (n_heads + n_layers) * 2 * 2  # targets x timesteps x pairs
    assert (
        summary["patching"]["source"] == "faces" and summary["patching"]["receiver"] == "synthetic"
    )
    assert "Activation patching" in (out / "report.html").read_text()
    attribution = pd.read_parquet(out / "tables" / "attribution.parquet")
    estimators = ("first_order", "ig_joint", "first_order+gn")
    assert (
        set(attribution.estimator) == set(estimators)
        and len(attribution) == n_heads * 3 * 2 * 2 * 2 * 2
    )
    assert set(summary["complexity_ratio"]) >= {
        "measure",
        "stand_in_for",
        "per_timestep",
        "pooled",
        "paper_ratio",
    }
    assert summary["complexity_ratio"]["measure"] == "ablation_participation_ratio"
    assert summary["complexity_ratio"]["stand_in_for"] is None
    assert [r["timestep"] for r in summary["complexity_ratio"]["per_timestep"]] == [20, 800]
    assert len(summary["complexity_measures"]) == 4 * 3  # measures x (2 timesteps + pooled)
    assert all(
        r["underpowered"] and r["mde_ratio"] is None for r in summary["complexity_measures"]
    )  # n = 3
    _assert_intervals_contain_estimates(summary, out)
    tests = pd.read_parquet(out / "tables" / "tests.parquet")
    assert {
        "family",
        "what",
        "statistic",
        "p_value",
        "p_corrected",
        "effect_size",
        "n_a",
        "n_b",
    } <= set(tests.columns)
    assert (tests.p_value > 0).all() and (tests.p_corrected >= tests.p_value - 1e-12).all()
    assert summary["tests"]["n_tests"] == len(tests)
    seeds = pd.read_parquet(out / "tables" / "seed_variance.parquet")
    assert sorted(seeds.seed.unique()) == [7, 8, 9]  # the run's seed and two more noise seeds
    main_seed = seeds[(seeds.seed == 7) & (seeds.quantity == "mean_entropy_norm")]
    for row in main_seed.itertuples():  # the main seed's value is the head table's own mean
        expected = heads[
            (heads.dataset == row.dataset) & (heads.timestep == row.timestep)
        ].entropy_norm.mean()
        assert row.value == pytest.approx(expected)
    divergence = pd.read_parquet(out / "tables" / "divergence.parquet").set_index("timestep")
    excess = seeds[(seeds.seed == 7) & (seeds.quantity == "wasserstein_excess_nats")]
    assert len(excess) == 2
    for row in excess.itertuples():  # the main seed's excess is the divergence table's own
        assert row.value == pytest.approx(divergence.wasserstein_excess_nats[row.timestep])
    assert summary["pending"] == []
    circuit = json.loads((out / "circuits" / "a_t20.json").read_text())
    assert {
        "dataset",
        "timesteps",
        "method",
        "metric",
        "tau",
        "heads",
        "faithfulness",
        "recovered_without_circuit",
        "claimed",
        "claim",
        "gap",
        "loss_full",
        "loss_empty",
        "n_necessary",
        "selection_frequency",
    } <= set(circuit)
    table = pd.read_parquet(out / "tables" / "circuits.parquet")
    assert len(table) == 2 * 2 * 3 * n_heads  # datasets x windows x taus x heads
    for path in (out / "circuits").glob(
        "*.json"
    ):  # 2 images: 4 sign patterns, p >= 1/4, so nothing is claimed
        c = json.loads(path.read_text())
        assert c["gap"]["n_images"] == 2 and c["gap"]["p_floor"] == 1 / 4
        assert (
            c["gap"]["family_size"] == 4 and c["gap"]["q_floor"] == 1.0
        )  # 2 datasets x 2 timesteps, corrected
        assert not c["claimed"] and "cannot go below 0.05" in c["claim"] and c["heads"] is None
        assert c["faithfulness"] is None and c["overlap_with_other"]["jaccard"] is None
    assert (
        not table.claimed.any()
        and len(pd.read_parquet(out / "tables" / "circuit_curves.parquet")) == 0
    )
    assert (
        len(pd.read_parquet(out / "tables" / "circuit_complexity.parquet")) == 0
    )  # no window with two circuits
    assert (
        all(not w["claimed"] for w in summary["circuits"]["windows"])
        and summary["circuits"]["tau"] == 0.05
    )
    assert (out / "figures" / "circuits.png").exists() and (
        out / "figures" / "circuit_curves.png"
    ).exists()
    assert {(r["estimator"], r["method"]) for r in summary["attribution"]} == {
        (e, m) for e in estimators for m in ("zero", "mean")
    }
    synthetic = heads[heads.dataset == "a"]
    assert (
        synthetic.object_affinity.notna().all()
        and heads[heads.dataset == "b"].object_affinity.isna().all()
    )
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and (out / "figures" / "entropy_heatmap.png").exists()
    assert "no circuit: ablating every head does not hurt significantly at this n" in html
    figures = sorted(p.stem for p in (out / "figures").glob("*.png"))
    assert figures == [
        "ablation_heads",
        "attention_gallery",
        "attribution_scatter",
        "circuit_curves",
        "circuits",
        "divergence",
        "entropy_heatmap",
        "patching",
        "role_map",
    ]
    assert html.count("data:image/png;base64,") == len(figures)
    gallery = pd.read_parquet(out / "tables" / "gallery.parquet")
    assert len(gallery) == 2 * 3 * 4 and gallery.timestep.unique().tolist() == [
        800
    ]  # datasets x images x heads
    np.testing.assert_allclose([m.sum() for m in gallery["map"]], 1, atol=1e-5)
    cmp = summary["paper_comparison"]
    divergence = pd.read_parquet(out / "tables" / "divergence.parquet")
    # headline claims at informative timesteps only: both datasets beat the trivial predictor (paired test)
    informative = {
        t
        for t in (20, 800)
        if all(d["informative"] for d in summary["denoising"] if d["timestep"] == t)
    }
    assert cmp["excluded_timesteps"] == sorted({20, 800} - informative)
    if informative:
        low = cmp["divergence_range"]["entropy_difference_nats"]["low"]
        kept = divergence[divergence.timestep.isin(informative)]
        assert low["entropy_diff_nats"] == pytest.approx(kept.entropy_diff_nats.min())
        assert cmp["divergence_range"]["paper_definition"].startswith("unknown")
        assert "definition of divergence is unknown" in html
    else:
        assert (
            "divergence_range" not in cmp
            and "<b>Left out</b> of the complexity, divergence and role rows" in html
        )
    assert cmp["complexity_ratio"]["per_timestep"] == [
        r for r in summary["complexity_ratio"]["per_timestep"] if r["timestep"] in informative
    ]
    assert "The paper's claims, measured here" in html and "25.6 – 128.3" in html
    datasets = pd.read_parquet(out / "tables" / "datasets.parquet")
    assert (
        len(datasets) == 5
        and len(summary["dataset_differences"]) == 5
        and "What else differs" in html
    )
    assert (
        manifest["datasets"]["a"]["rendering"] == "gray"
        and manifest["datasets"]["b"]["in_training_set"] is None
    )


def test_reported_entropy_agrees_with_a_plain_pytorch_reference(tiny_run, small_model_dir):
    """Recompute one layer's entropy for one image from the saved model and the recorded noise."""
    from diffusers import UNet2DModel

    from diffcircuit.data.synthetic import synthetic_images
    from diffcircuit.models.noise import image_noise

    out, _ = tiny_run
    heads = pd.read_parquet(out / "tables" / "head_metrics.parquet")
    net = UNet2DModel.from_pretrained(small_model_dir / "unet").eval()
    layer = "down_blocks.0.attentions.0"
    captured = {}
    net.get_submodule(layer).register_forward_pre_hook(lambda m, a: captured.__setitem__("x", a[0]))
    x0 = torch.from_numpy(
        synthetic_images(3, size=16, seed=7, gray=True)[0][2:3]
    )  # gray: the faces (b) are
    eps = image_noise((3, 16, 16), seed=7, dataset="a", image=2, timestep=800)[None]
    t = torch.tensor([800])
    from diffusers import DDPMScheduler

    x_t = DDPMScheduler(num_train_timesteps=1000).add_noise(x0, eps, t)
    with torch.no_grad():
        net(x_t, t)
    attn = net.get_submodule(layer)
    h = captured["x"]
    tokens = attn.group_norm(h.flatten(2)).transpose(1, 2)
    q, k = attn.to_q(tokens), attn.to_k(tokens)
    d = q.shape[-1] // attn.heads
    q = q.view(1, -1, attn.heads, d).transpose(1, 2).double()
    k = k.view(1, -1, attn.heads, d).transpose(1, 2).double()
    p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), -1)
    ref = (-(p * p.log()).sum(-1).mean(-1))[0]
    got = heads.query(
        "dataset == 'a' and image == 2 and timestep == 800 and layer == @layer"
    ).sort_values("head")
    assert torch.allclose(torch.tensor(got.entropy_nats.to_numpy()), ref, atol=1e-4)


def test_rerun_same_config_is_accepted_other_config_refused(tiny_run, capsys):
    out, args = tiny_run
    assert _run(args, capsys)[0] == 0
    code, _, err = _run([*args[:-3], "--seed", "8", "--quiet"], capsys)
    assert code == 1 and "different config" in err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--model", "/no/such/model"], "neither an existing folder"),
        (["--timesteps", "1,x"], "--timesteps must be comma-separated integers"),
        (["--config", "/no/such.yaml"], "cannot read config"),
        (["--timesteps", "1000"], "--timesteps [1000] are outside the model's"),
        (["--n", "0"], "at least 1"),
        (["--data-b", "nowhere"], "not one of"),
        (["--data-b", "faces", "--n", "101"], "100"),
        (["--batch-size", "abc"], "Invalid value for '--batch-size'"),
    ],
)
def test_bad_input_gives_one_line_and_writes_nothing(tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    code, _, err = _run(["run", "--out", str(out), "--quiet", *extra], capsys)
    assert code != 0
    assert len(err.strip().splitlines()) == 1 and message in err
    assert not out.exists()


def test_pickle_checkpoint_refused_from_the_command_line(small_model_dir, small_unet, capsys):
    unet = small_model_dir / "unet"
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(small_unet.state_dict(), unet / "diffusion_pytorch_model.bin")
    code, _, err = _run(["info", "--model", str(small_model_dir)], capsys)
    assert code == 1 and "--allow-pickle" in err
    assert (
        _run(["info", "--model", str(small_model_dir), "--allow-pickle", "--json"], capsys)[0] == 0
    )


def test_console_script_help_and_error_without_traceback(tmp_path):
    exe = [sys.executable, "-m", "diffcircuit.cli"]
    for cmd in ([], ["info"], ["run"], ["report"], ["train-tiny"]):
        res = subprocess.run([*exe, *cmd, "--help"], capture_output=True, text=True)
        assert res.returncode == 0 and "Usage" in res.stdout
    res = subprocess.run([*exe, "report", str(tmp_path)], capture_output=True, text=True)
    assert (
        res.returncode == 1
        and "Traceback" not in res.stderr
        and len(res.stderr.strip().splitlines()) == 1
    )


def test_fused_and_naive_capture_give_the_same_tables(tiny_run, tmp_path, capsys):
    out, args = tiny_run
    naive = tmp_path / "naive"
    args = [a if a != str(out) else str(naive) for a in args] + ["--capture", "naive"]
    assert _run(args, capsys)[0] == 0
    a = pd.read_parquet(out / "tables" / "head_metrics.parquet")
    b = pd.read_parquet(naive / "tables" / "head_metrics.parquet")
    numeric = [c for c in a.columns if a[c].dtype.kind == "f"]
    pd.testing.assert_frame_equal(a[numeric], b[numeric], atol=1e-4, rtol=1e-4)


def test_ablate_command(small_model_dir, tmp_path, capsys):
    out = tmp_path / "ab"
    code, stdout, err = _run(
        [
            "ablate",
            "--out",
            str(out),
            "--model",
            str(small_model_dir),
            "--n",
            "2",
            "--quiet",
            "--target",
            "mid_block.attentions.0:1",
            "--level",
            "block",
            "--methods",
            "zero,noise",
        ],
        capsys,
    )
    assert code == 0, err
    table = pd.read_parquet(out / "tables" / "ablations.parquet")
    assert set(table.target) == {
        "mid_block.attentions.0:1",
        "down_blocks.0",
        "down_blocks.1",
        "mid_block",
        "up_blocks.0",
        "up_blocks.1",
    }
    assert set(table.method) == {"zero", "noise"} and len(table) == 6 * 2 * 2
    recorded = json.loads((out / "ablate.json").read_text())
    assert (
        recorded["finished"]
        and recorded["config"]["methods"] == ["zero", "noise"]
        and len(recorded["targets"]) == 6
    )
    sampling = [
        "--target",
        "mid_block.attentions.0",
        "--sample",
        "2",
        "--sample-steps",
        "4",
        "--window",
        "0,500",
    ]
    code, _, err = _run(
        [
            "ablate",
            "--out",
            str(out),
            "--model",
            str(small_model_dir),
            "--n",
            "2",
            "--quiet",
            *sampling,
        ],
        capsys,
    )
    assert (
        code == 1 and "different config" in err and len(err.strip().splitlines()) == 1
    )  # not replaced silently
    out = tmp_path / "sampled"
    code, _, err = _run(
        [
            "ablate",
            "--out",
            str(out),
            "--model",
            str(small_model_dir),
            "--n",
            "2",
            "--quiet",
            *sampling,
        ],
        capsys,
    )
    assert code == 0, err
    sampled = pd.read_parquet(out / "tables" / "sampling.parquet")
    assert (
        len(sampled) == 2 and set(sampled.window) == {"0-500"} and sampled.ssim.between(-1, 1).all()
    )
    code, _, err = _run(
        [
            "ablate",
            "--out",
            str(tmp_path / "bad"),
            "--model",
            str(small_model_dir),
            "--target",
            "x:1",
        ],
        capsys,
    )
    assert code == 1 and len(err.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()


def test_calibrate_prints_rates_within_binomial_tolerance(small_model_dir, capsys):
    from scipy import stats

    code, out, err = _run(
        [
            "calibrate",
            "--model",
            str(small_model_dir),
            "--data",
            "synthetic",
            "--n",
            "40",
            "--splits",
            "100",
            "--timesteps",
            "500",
        ],
        capsys,
    )  # --timesteps, as every command says
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[1].startswith(
        "ablation_participation_ratio (primary): false_positive_rate "
    )  # the primary first
    assert [line.split(":")[0].split(" ")[0] for line in lines[1:5]] == [
        "ablation_participation_ratio",
        "ablation_heads_for_90pct",
        "mean_entropy_norm",
        "mean_effective_keys_frac",
    ]
    lo, hi = stats.binom.ppf([0.0005, 0.9995], 100, 0.05) / 100
    for line in lines[1:5]:
        fpr = float(line.split("false_positive_rate ")[1].split(" ")[0])
        coverage = float(line.split("coverage ")[1].split(" ")[0])
        assert lo <= fpr <= hi and 0.85 <= coverage <= 1.0, line
        assert line.count("consistent with nominal") + line.count("too few splits to tell") == 2, (
            line
        )
    assert lines[-1].startswith("verdict: ")


def test_config_file_and_flag_override(tmp_path, small_model_dir, capsys):
    cfg = tmp_path / "run.yaml"
    assert _run(["init-config", str(cfg)], capsys)[0] == 0
    text = (
        cfg.read_text()
        .replace("n: 100", "n: 2")
        .replace("model: embedded", f"model: {small_model_dir}")
    )
    text = text.replace("timesteps: [100, 500, 900]", "timesteps: [10]").replace(
        "ablate_n: 16", "ablate_n: 0"
    )
    cfg.write_text(text.replace("seed_repeats: 2", "seed_repeats: 0"))
    out = tmp_path / "run"
    code, _, err = _run(
        ["run", "--out", str(out), "--config", str(cfg), "--seed", "3", "--quiet"], capsys
    )
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert (
        manifest["config"]["n"] == 2
        and manifest["config"]["seed"] == 3
        and manifest["config"]["timesteps"] == [10]
    )
    summary = json.loads(
        (out / "summary.json").read_text()
    )  # no ablation: the complexity row is a labelled stand-in
    assert summary["complexity_ratio"]["stand_in_for"] == "ablation_participation_ratio"
    assert "withheld" in summary["paper_comparison"]["complexity_ratio"]
    assert "(stand-in: ablation not run)" in (out / "report.html").read_text()
    _assert_intervals_contain_estimates(summary, out)
    assert _run(["init-config", str(cfg)], capsys)[0] == 1  # refuses to overwrite without --force
    cfg.write_text("n: 2\nbogus_key: 1\n")
    code, _, err = _run(["run", "--out", str(tmp_path / "r2"), "--config", str(cfg)], capsys)
    assert code == 1 and "bogus_key" in err and len(err.strip().splitlines()) == 1
    cfg.write_text("n: many\n")
    code, _, err = _run(["run", "--out", str(tmp_path / "r3"), "--config", str(cfg)], capsys)
    assert code == 1 and "'n' must be an integer" in err


def test_discover_writes_circuits_curves_and_figures(small_model_dir, tmp_path, capsys):
    out = tmp_path / "disc"
    code, _, err = _run(
        [
            "discover",
            "--out",
            str(out),
            "--model",
            str(small_model_dir),
            "--n",
            "3",
            "--timesteps",
            "20,700",
            "--window",
            "20,700",
            "--window",
            "700",
            "--resamples",
            "2",
            "--quiet",
        ],
        capsys,
    )
    assert code == 0, err
    n_heads = 22
    assert sorted(p.name for p in (out / "circuits").iterdir()) == [
        "a_t20-700.json",
        "a_t700.json",
        "b_t20-700.json",
        "b_t700.json",
    ]
    assert json.loads((out / "circuits" / "a_t20-700.json").read_text())["timesteps"] == [20, 700]
    circuit = json.loads((out / "circuits" / "b_t700.json").read_text())
    assert circuit["ranking"] == "attribution: first order + Gauss-Newton (1 probe), mean ablation"
    assert (
        not circuit["claimed"] and circuit["heads"] is None
    )  # 3 images cannot show a positive gap at p < 0.05
    importance = pd.read_parquet(out / "tables" / "importance.parquet")
    assert len(importance) == 2 * 2 * 3 * n_heads  # datasets x timesteps x images x heads
    table = pd.read_parquet(out / "tables" / "circuits.parquet")
    primary = table[(table.tau == 0.05) & (table.dataset == "b") & (table.window == "700")]
    assert len(primary) == n_heads and not primary.in_circuit.any()
    assert (out / "figures" / "circuits.png").stat().st_size > 1000 and (
        out / "figures" / "circuit_curves.png"
    ).exists()
    record = json.loads((out / "discover.json").read_text())
    assert (
        record["config"]["ranking"] == "attribution"
        and record["config"]["mean_reference"] == "heldout"
    )
    # the synthetic set in gray beside LFW's grayscale faces; the mean from images 3..5, not the evaluated 0..2
    assert (
        record["datasets"]["a"]["rendering"] == "gray"
        and record["datasets"]["b"]["in_training_set"] is None
    )
    assert record["datasets"]["b"]["mean_reference"] == [{"dataset": "b", "images": [3, 6]}]


def test_discover_claims_a_circuit_with_its_gap_necessity_and_labelled_range(tmp_path, capsys):
    out = tmp_path / "disc"
    code, printed, err = _run(
        [
            "discover",
            "--out",
            str(out),
            "--n",
            "6",
            "--timesteps",
            "300",
            "--data-b",
            "none",
            "--resamples",
            "2",
            "--circuit-metric",
            "output",
        ],
        capsys,
    )
    assert code == 0, err
    c = json.loads((out / "circuits" / "a_t300.json").read_text())
    assert (
        c["metric"] == "output" and c["loss_full"] == 0
    )  # distance to the full model's own output
    assert (
        c["claimed"] and c["gap"]["p_value"] == 1 / 64 and len(c["heads"]) == c["size"] > 0
    )  # all 6 images agree
    assert c["size_ci"] is None and c["size_range"] == [min(c["boot_sizes"]), max(c["boot_sizes"])]
    assert 0 <= c["n_necessary"] <= c["size"] and c["faithfulness"] >= 0.95
    assert "range" in printed  # two resamples: their range, not a CI
    record = json.loads((out / "discover.json").read_text())
    assert record["config"]["metric"] == "output" and record["circuits"][0]["claimed"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--ranking", "magic"], "--ranking must be one of"),
        (["--circuit-metric", "kl"], "--circuit-metric must be one of"),
        (["--taus", "0.05,1.5"], "a fraction of the gap"),
        (["--ig-steps", "-1"], "--ig-steps >= 0"),
        (["--ig-steps", "2", "--probes", "1"], "alternatives"),
        (["--taus", "0.02,0.1"], "must include the primary"),
        (["--taus", "a,b"], "--taus must be comma-separated numbers"),
        (["--n", "1"], "need --n >= 2"),
        (["--timesteps", "5000"], "outside the model's"),
        (["--timesteps", "100,500", "--window", "100,900"], "every window in --window must be"),
        (["--mean-reference", "median"], "--mean-reference must be one of"),
        (["--synthetic-color", "blue"], "--synthetic-color must be one of"),
        (["--match-histogram", "--data-a", "nonfaces"], "exactly one of"),
        (["--n", "60"], "needs 2 x --n images"),
    ],
)
def test_discover_refuses_bad_input_in_one_line_and_writes_nothing(
    small_model_dir, tmp_path, capsys, args, message
):
    out = tmp_path / "disc"
    code, _, err = _run(
        ["discover", "--out", str(out), "--model", str(small_model_dir), *args], capsys
    )
    assert code != 0 and message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_generate_writes_a_grid_and_metrics_that_match_the_samples(
    small_model_dir, tmp_path, capsys
):
    from diffcircuit import load_denoiser
    from diffcircuit.interventions.ablation import Target
    from diffcircuit.interventions.sampling import sample_images

    out = tmp_path / "gen" / "grid.png"
    code, printed, err = _run(
        [
            "generate",
            "--out",
            str(out),
            "--model",
            str(small_model_dir),
            "--ablate",
            "down_blocks.0.attentions.0:1,mid_block.attentions.0",
            "--n",
            "3",
            "--steps",
            "4",
            "--seed",
            "2",
        ],
        capsys,
    )
    assert code == 0, err
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = json.loads(out.with_suffix(".json").read_text())
    assert len(record["heads"]) == 1 + 4 and len(record["samples"]) == 3
    den = load_denoiser(str(small_model_dir))
    registry = probe_registry(den, torch.zeros(1, 3, 16, 16), torch.zeros(1, dtype=torch.long))
    target = Target(level="set", name="x", heads=tuple(registry.parse(a) for a in record["heads"]))
    clean = sample_images(den, n=3, steps=4, seed=2)
    changed = sample_images(den, n=3, steps=4, seed=2, target=target)
    expected = ((clean - changed) ** 2).flatten(1).mean(1)
    np.testing.assert_allclose(
        [s["pixel_mse"] for s in record["samples"]], expected.numpy(), rtol=1e-5
    )
    assert "pixel MSE" in printed


@pytest.mark.parametrize(
    "args, message",
    [
        (["--ablate", "nope:3"], "is not a head address"),
        (
            ["--ablate", "mid_block.attentions.0", "--scale", "2"],
            "--scale goes with --method 'scale'",
        ),
        (["--ablate", "mid_block.attentions.0", "--method", "blur"], "--method must be one of"),
        (["--ablate", "mid_block.attentions.0", "--window", "900,100"], "LO <= HI"),
    ],
)
def test_generate_refuses_bad_input_in_one_line_and_writes_nothing(
    small_model_dir, tmp_path, capsys, args, message
):
    out = tmp_path / "gen" / "grid.png"
    code, _, err = _run(
        ["generate", "--out", str(out), "--model", str(small_model_dir), "--steps", "2", *args],
        capsys,
    )
    assert code != 0 and message in err and len(err.strip().splitlines()) == 1
    assert not out.parent.exists()


def _corpus_folder(folder):
    """Unusual but valid images: RGBA, 16-bit, CMYK JPEG, palette and grayscale."""
    from PIL import Image

    folder.mkdir()
    rgb = (np.random.default_rng(0).random((20, 24, 3)) * 255).astype(np.uint8)
    Image.fromarray(np.dstack([rgb, np.full((20, 24), 128, np.uint8)]), "RGBA").save(
        folder / "rgba.png"
    )
    Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(folder / "deep.png")
    Image.fromarray(rgb, "RGB").convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(rgb, "RGB").convert("P", palette=Image.Palette.ADAPTIVE).save(
        folder / "palette.png"
    )
    Image.fromarray(rgb[..., 1], "L").save(folder / "grey.png")
    return folder


def test_a_run_on_unusual_valid_images_succeeds_and_a_corrupt_one_is_named(
    small_model_dir, tmp_path, capsys
):
    folder = _corpus_folder(tmp_path / "images")
    base = [
        "run",
        "--model",
        str(small_model_dir),
        "--data-b",
        str(folder),
        "--n",
        "5",
        "--timesteps",
        "500",
        "--ablate-n",
        "0",
        "--seed-repeats",
        "0",
        "--quiet",
    ]
    code, _, err = _run([*base, "--out", str(tmp_path / "ok")], capsys)
    assert code == 0, err
    assert pd.read_parquet(tmp_path / "ok" / "tables" / "denoising.parquet").eps_mse.notna().all()
    (folder / "aa_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    code, _, err = _run([*base, "--out", str(tmp_path / "bad")], capsys)
    assert code == 1 and "aa_broken.png" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()
    code, _, err = _run([*base, "--skip-bad", "--out", str(tmp_path / "skipped")], capsys)
    assert code == 0, err
    warned = [line for line in err.splitlines() if "aa_broken.png" in line]
    assert len(warned) == 1 and warned[0].startswith(
        "diffcircuit: warning: skipping"
    )  # one line, not Python's form


def test_analyses_select_what_runs(small_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = _run(
        [
            "run",
            "--out",
            str(out),
            "--model",
            str(small_model_dir),
            "--n",
            "3",
            "--timesteps",
            "20",
            "--ablate-n",
            "2",
            "--seed-repeats",
            "0",
            "--analyses",
            "ablation,attribution",
            "--quiet",
        ],
        capsys,
    )
    assert code == 0, err
    tables = {p.stem for p in (out / "tables").glob("*.parquet")}
    assert {"ablations", "attribution"} <= tables and not {
        "patching",
        "circuits",
        "circuit_curves",
    } & tables
    summary = json.loads((out / "summary.json").read_text())
    assert {"patching", "circuits"} <= set(summary["pending"]) and "ablation" not in summary[
        "pending"
    ]


def test_a_text_model_without_a_text_encoder_needs_prompt_embeddings(tmp_path, capsys, text_unet):
    from diffusers import DDPMScheduler
    from safetensors.torch import save_file

    from diffcircuit.models.loading import save_denoiser

    net = text_unet(text_dim=24)
    folder = save_denoiser(
        tmp_path / "cond", net, DDPMScheduler()
    )  # a UNet alone: no tokenizer, no text encoder
    code, out, err = _run(
        ["info", "--json", "--model", str(folder)], capsys
    )  # listing layers needs no prompt
    assert code == 0, err
    listed = json.loads(out)
    assert {l["n_keys"] for l in listed["layers"] if l["kind"] == "cross"} == {
        None
    } and "no prompt" in listed["note"]
    assert all(
        l["n_keys"] == math.prod(l["query_grid"]) for l in listed["layers"] if l["kind"] == "self"
    )
    code, _, err = _run(["run", "--out", str(tmp_path / "run"), "--model", str(folder)], capsys)
    assert (
        code == 1 and "give --prompt-embeds" in err and len(err.strip().splitlines()) == 1
    )  # running it needs one
    code, _, err = _run(["discover", "--out", str(tmp_path / "ab"), "--model", str(folder)], capsys)
    assert (
        code == 1 and "give --prompt-embeds" in err
    )  # discover takes conditional models the same way
    assert not (tmp_path / "run").exists() and not (tmp_path / "ab").exists()
    save_file({"prompt_embeds": torch.randn(5, 24)}, str(tmp_path / "embeds.safetensors"))
    code, out, _ = _run(
        [
            "info",
            "--json",
            "--model",
            str(folder),
            "--prompt-embeds",
            str(tmp_path / "embeds.safetensors"),
        ],
        capsys,
    )
    layers = json.loads(out)["layers"]
    assert code == 0 and {l["n_keys"] for l in layers if l["kind"] == "cross"} == {
        5
    }  # keys: the 5 given tokens
    save_file({"other": torch.randn(5, 24)}, str(tmp_path / "bad.safetensors"))
    code, _, err = _run(
        ["info", "--model", str(folder), "--prompt-embeds", str(tmp_path / "bad.safetensors")],
        capsys,
    )
    assert code == 1 and "no tensor named 'prompt_embeds'" in err


def test_a_processor_diffcircuit_does_not_reproduce_is_listed_by_info_and_refused_by_run(
    tmp_path, capsys
):
    """UnCLIP-style blocks run AttnAddedKVProcessor2_0: info lists their heads without geometry, run stops in one line."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from safetensors.torch import save_file

    from diffcircuit.models.loading import save_denoiser

    torch.manual_seed(0)
    net = UNet2DConditionModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        cross_attention_dim=8,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    folder = save_denoiser(tmp_path / "kv", net, DDPMScheduler())
    save_file({"prompt_embeds": torch.randn(3, 8)}, str(tmp_path / "embeds.safetensors"))
    embeds = ["--prompt-embeds", str(tmp_path / "embeds.safetensors")]
    code, out, _ = _run(["info", "--json", "--model", str(folder), *embeds], capsys)
    info = json.loads(out)
    assert (
        code == 0
        and len(info["layers"]) == 4
        and all(l["query_grid"] is None for l in info["layers"])
    )
    assert "AttnAddedKVProcessor2_0" in info["note"]
    code, _, err = _run(
        [
            "run",
            "--out",
            str(tmp_path / "run"),
            "--model",
            str(folder),
            *embeds,
            "--n",
            "2",
            "--ablate-n",
            "1",
        ],
        capsys,
    )
    assert code == 1 and "AttnAddedKVProcessor2_0" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_output_directories_that_cannot_be_written_or_are_in_use_are_refused_in_one_line(
    small_model_dir, tmp_path, capsys
):
    from diffcircuit.protocol.store import claim_directory

    (tmp_path / "a-file").write_text("not a folder")
    base = ["--model", str(small_model_dir)]
    for command in (
        [
            "run",
            "--n",
            "2",
            "--timesteps",
            "500",
            "--ablate-n",
            "1",
            "--analyses",
            "observe",
            "--quiet",
        ],
        ["ablate", "--n", "2", "--target", "mid_block.attentions.0:1", "--quiet"],
        ["generate", "--n", "1", "--steps", "2", "--ablate", "mid_block.attentions.0"],
    ):
        out = tmp_path / "a-file" / ("grid.png" if command[0] == "generate" else "out")
        code, _, err = _run([command[0], "--out", str(out), *base, *command[1:]], capsys)
        assert code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (
            command,
            err,
        )
    busy = tmp_path / "busy"
    with claim_directory(busy):  # another run holds the directory
        code, _, err = _run(
            [
                "run",
                "--out",
                str(busy),
                *base,
                "--n",
                "2",
                "--timesteps",
                "500",
                "--ablate-n",
                "1",
                "--quiet",
            ],
            capsys,
        )
    assert (
        code == 1
        and "in use by another diffcircuit run" in err
        and not (busy / "run.json").exists()
    )


def test_a_model_folder_whose_config_is_not_json_is_refused_in_one_line(
    small_model_dir, tmp_path, capsys
):
    (small_model_dir / "unet" / "config.json").write_text('{"_class_name": "UNet2DModel",\n  oops}')
    for command in (
        ["info", "--model", str(small_model_dir)],
        ["run", "--out", str(tmp_path / "run"), "--model", str(small_model_dir), "--quiet"],
    ):
        code, _, err = _run(command, capsys)
        assert (
            code == 1 and len(err.strip().splitlines()) == 1 and "not valid JSON (line 2" in err
        ), err
    assert not (tmp_path / "run").exists()


def test_a_latent_transformer_without_its_autoencoder_is_refused_in_one_line(
    tmp_path, capsys, transformer_folder
):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    net = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=1,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=10,
    )
    folder = transformer_folder(tmp_path / "bare-dit", net, "DiTPipeline") / "transformer"
    code, _, err = _run(
        [
            "run",
            "--out",
            str(tmp_path / "run"),
            "--model",
            str(folder),
            "--class-label",
            "1",
            "--quiet",
        ],
        capsys,
    )
    assert code == 1 and len(err.strip().splitlines()) == 1 and "needs its autoencoder" in err, err


def test_ctrl_c_says_the_run_stopped_and_how_to_resume(
    small_model_dir, tmp_path, capsys, monkeypatch
):
    import diffcircuit.protocol.runner as runner

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "_run_stages", interrupted)
    code, _, err = _run(
        [
            "run",
            "--out",
            str(tmp_path / "run"),
            "--model",
            str(small_model_dir),
            "--n",
            "2",
            "--timesteps",
            "500",
            "--ablate-n",
            "1",
            "--quiet",
        ],
        capsys,
    )
    assert code == 130 and "stopped (Ctrl-C)" in err and "resumes from the shards" in err


def test_version_and_quiet_on_every_command(capsys):
    from diffcircuit import __version__

    code, out, _ = _run(["--version"], capsys)
    assert code == 0 and out.strip() == f"diffcircuit {__version__}"
    commands = [
        "info",
        "run",
        "ablate",
        "discover",
        "generate",
        "calibrate",
        "guidance",
        "cache",
        "report",
        "train-tiny",
        "init-config",
    ]
    for command in commands:
        code, out, _ = _run([command, "--help"], capsys)
        assert code == 0 and "--quiet" in out, command
        if command not in ("report", "init-config"):  # every command that runs a model places it
            assert "--device" in out and "--precision" in out, command


def test_the_smallest_run_one_image_ablated_completes_without_warnings(
    small_model_dir, tmp_path, capsys
):
    """One ablated image: every test that needs two (the gap's sign flips, d_z) degrades to its exact
    one-image form or an undefined effect size; no traceback, no numpy warning on stderr."""
    out = tmp_path / "run"
    args = ["run", "--out", str(out), "--model", str(small_model_dir), "--n", "2"]
    code, _, err = _run([*args, "--ablate-n", "1", "--timesteps", "500", "--quiet"], capsys)
    assert code == 0 and "Warning" not in err and "Traceback" not in err, err
    windows = json.loads((out / "summary.json").read_text())["circuits"]["windows"]
    gaps = [w["gap"] for w in windows]
    assert gaps and all(g["n_images"] == 1 and g["p_value"] >= 0.5 for g in gaps)
    assert not any(w["claimed"] for w in windows)  # nothing can be claimed from one image
    assert all(g["ci_low"] is None for g in gaps)  # nor an interval drawn
