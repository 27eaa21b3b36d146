from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from diffcircuit.metrics.attention import HEAD_METRICS
from diffcircuit.protocol.analyses import derived_tables


def _heads(n=30, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for dataset, shift in (("a", 0.0), ("b", 0.8)):
        for image in range(n):
            for t in (100, 900):
                for head in range(3):
                    row = {"dataset": dataset, "image": image, "timestep": t, "layer": "L", "head": head, "n_keys": 64,
                           "entropy_nats": rng.normal(3 + shift * (head == 0), 0.2)}
                    row["entropy_norm"] = row["entropy_nats"] / np.log(64)
                    row |= {m: rng.normal(1, 0.1) for m in HEAD_METRICS}
                    if dataset == "b":
                        row["object_affinity"] = np.nan
                    rows.append(row)
    return pd.DataFrame(rows)


def test_head_summary_means_and_cis():
    heads = _heads()
    summary = derived_tables(heads)["head_summary"]
    assert len(summary) == 2 * 2 * 3 * (2 + len(HEAD_METRICS))
    row = summary.query("dataset == 'a' and timestep == 100 and head == 1 and metric == 'entropy_nats'").iloc[0]
    expected = heads.query("dataset == 'a' and timestep == 100 and head == 1").entropy_nats.mean()
    assert row["mean"] == pytest.approx(expected) and row.ci_low < expected < row.ci_high and row.n_images == 30
    assert summary.query("dataset == 'b' and metric == 'object_affinity'")["mean"].isna().all()


def test_divergence_finds_the_head_that_differs():
    tables = derived_tables(_heads(n=80))
    per_head = tables["divergence_heads"].query("timestep == 100").set_index("head").jsd_bits
    assert per_head.idxmax() == 0
    div = tables["divergence"]
    assert list(div.timestep) == [100, 900] and (div.p_value < 0.05).all()
    assert div.value.iloc[0] == pytest.approx(per_head.mean())


def test_holm_correction_on_request():
    from statsmodels.stats.multitest import multipletests

    heads = _heads(n=20)
    bh = derived_tables(heads)["tests"]
    holm = derived_tables(heads, correction="holm")["tests"]
    for family, g in holm.groupby("family"):
        np.testing.assert_allclose(g.p_corrected, multipletests(g.p_value, method="holm")[1])
    assert (holm.p_corrected >= bh.p_corrected - 1e-12).all()  # Holm is the more conservative
