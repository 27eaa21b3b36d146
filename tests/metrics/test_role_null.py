"""The role null on the embedded model: its scores against separate forwards, and planted heads.

A head forced (by a test processor) to attend to the highest-gradient keys of the image it looks at must get
the edge role on any images; a head that looks at the centre of images whose textured content always sits
in the centre must get no content role (its raw texture affinity is high); heads forced to attend at
random must give uniform p-values.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

import diffcircuit as dc
from diffcircuit import instrument, observe, probe_registry
from diffcircuit.metrics.attention import CONTENT_PROBES, metrics_from_moments, uniform_moments
from diffcircuit.metrics.observe import observe_with_null
from diffcircuit.metrics.probes import ProbeFeatures
from diffcircuit.metrics.roles import CONTENT_ROLES
from diffcircuit.models.diffusion import add_noise
from diffcircuit.models.noise import batch_noise
from diffcircuit.protocol.roles import (
    head_roles_table,
    permutation_table,
    role_tests_table,
)

LAYER = "down_blocks.1.attentions.0"  # 16x16 queries and keys
RAW = {
    "edge": "edge_affinity",
    "texture": "texture_affinity",
    "intensity": "intensity_affinity",
    "object": "object_affinity",
    "background": "background_affinity",
}


@pytest.fixture(scope="module")
def den():
    return dc.load_denoiser()


def _roles(den, images, masks=None, *, t=500, permutations=4999):
    found = observe_with_null(den, images, timesteps=[t], masks=masks)
    perms = {"a": permutation_table(found.blocks, seed=0, dataset="a", n_permutations=permutations)}
    tests = role_tests_table(found.heads, perms)
    return found, tests, head_roles_table(found.heads, tests)


def _head(frame, head=3, layer=LAYER):
    return frame[(frame.layer == layer) & (frame["head"] == head)]


def test_scores_equal_separate_forwards_with_another_images_features(den):
    """S[0, j]: image 0's attention scored by image j's features, as one forward per j with j's key features."""
    syn = dc.model_images(den, "synthetic", n=6)
    found = observe_with_null(den, syn.images, timesteps=[500], masks=syn.masks, batch_size=4)
    x0 = torch.from_numpy(syn.images[:1])
    t = torch.full((1,), 500)
    x_t = add_noise(
        x0,
        batch_noise(x0.shape[1:], seed=0, dataset="a", images=[0], timestep=500),
        t,
        den.alphas_cumprod,
    )
    grid = probe_registry(den, x_t, t).layer(LAYER).query_grid
    logs = []
    for j in range(6):
        pf = ProbeFeatures(
            torch.from_numpy(syn.images[j : j + 1]), torch.from_numpy(syn.masks[j : j + 1])
        )
        with instrument(den.network, capture=True, key_features=pf) as session:
            den.network(x_t, t)
        moments = session.pop("moments")[LAYER]
        m = metrics_from_moments(
            moments,
            uniform_moments(pf(grid)),
            torch.ones(moments.shape[:2]),
            grid=grid,
            has_masks=True,
        )
        logs.append({p: np.log(m[RAW[p]][0].double().numpy()) for p in CONTENT_PROBES})
    rows = found.heads[(found.heads.image == 0) & (found.heads.layer == LAYER)].sort_values("head")
    for probe in CONTENT_PROBES:
        own = logs[0][probe]
        others = np.mean([logs[j][probe] for j in range(1, 6)], axis=0)
        np.testing.assert_allclose(rows[f"{probe}_log"], own, atol=2e-3)
        np.testing.assert_allclose(rows[f"{probe}_excess"], own - others, atol=2e-3)


def test_observation_is_unchanged_by_the_null(den):
    syn = dc.model_images(den, "synthetic", n=6)
    plain, _ = observe(den, syn.images, timesteps=[100], masks=syn.masks, batch_size=3)
    found = observe_with_null(
        den, syn.images, timesteps=[100], masks=syn.masks, blocks=[(0, 3), (3, 6)]
    )
    merged = plain.merge(found.heads, on=["dataset", "image", "timestep", "layer", "head"])
    assert len(merged) == len(plain)
    for col in ("entropy_nats", "edge_affinity", "intensity_affinity", "eps_mse"):
        np.testing.assert_allclose(
            merged[f"{col}_x"], merged[f"{col}_y"], rtol=1e-6, equal_nan=True
        )


@pytest.mark.parametrize("spec", ["synthetic", "faces", "nonfaces"])
def test_a_head_that_attends_to_the_highest_gradient_keys_is_an_edge_head(den, forced_heads, spec):
    images = dc.model_images(den, spec, n=24)
    with forced_heads.forcing(den.network, forced_heads.edge, {LAYER: [3]}):
        _, tests, roles = _roles(den, images.images, images.masks)
    edge = _head(tests[tests.probe == "edge"]).iloc[0]
    assert edge.q_value < 0.05 and edge.ci_low > 0
    assert _head(roles).role.item() == "edge"


def _centred_patches(n: int, seed: int = 0) -> np.ndarray:
    """Gray images, each with a patch of random texture at the same central position: content and position coincide."""
    rng = np.random.default_rng(seed)
    images = np.zeros((n, 3, 32, 32), dtype=np.float32)
    for i in range(n):
        images[i, :, 10:22, 10:22] = rng.uniform(-0.9, 0.9, size=(12, 12)).astype(np.float32)
    return images


def test_a_positional_head_on_centred_content_gets_no_content_role(den, forced_heads):
    images = _centred_patches(24)
    with forced_heads.forcing(den.network, forced_heads.centre, {LAYER: [3]}):
        found, tests, roles = _roles(den, images)
    head = _head(roles).iloc[0]
    assert (
        _head(found.heads).texture_affinity.mean() > 2
    )  # a high raw score, explained by position alone
    assert head.role not in CONTENT_ROLES
    assert "texture" in head.raw_only.split(",")
    texture = _head(tests[tests.probe == "texture"]).iloc[0]
    assert texture.ci_low < 0 < texture.ci_high


def test_random_attention_gives_uniform_p_values(den, forced_heads):
    images = dc.model_images(den, "synthetic", n=16)
    layers = {i.layer: list(range(i.heads)) for i in dc.HeadRegistry.from_model(den.network).layers}
    generator = torch.Generator().manual_seed(0)
    with forced_heads.forcing(den.network, forced_heads.random, layers, generator):
        _, tests, roles = _roles(den, images.images, images.masks, permutations=999)
    for probe, g in tests.groupby("probe"):
        assert stats.kstest(g.p_value, "uniform").pvalue > 0.001, probe
    assert not roles.role.isin(CONTENT_ROLES).any()


def test_no_content_role_where_content_and_position_coincide(den):
    """The embedded model's own heads on centred patches: raw texture and intensity scores, and no content claim."""
    _, tests, roles = _roles(den, _centred_patches(24))
    assert roles.raw_only.str.len().gt(0).any()  # the raw rules would have labelled some heads
    assert not roles.role.isin(CONTENT_ROLES).any()


def test_permutation_sums_do_not_depend_on_how_blocks_are_grouped(den):
    syn = dc.model_images(den, "synthetic", n=8)
    kw = dict(timesteps=[500], masks=syn.masks)
    together = observe_with_null(den, syn.images, blocks=[(0, 4), (4, 8)], **kw)
    first = observe_with_null(den, syn.images[:4], **(kw | dict(masks=syn.masks[:4])))
    second = observe_with_null(den, syn.images[4:], first=4, **(kw | dict(masks=syn.masks[4:])))
    a = permutation_table(together.blocks, seed=0, dataset="a", n_permutations=99)
    b = pd_concat(
        [
            permutation_table(f.blocks, seed=0, dataset="a", n_permutations=99)
            for f in (first, second)
        ]
    )
    tests_a = role_tests_table(together.heads, {"a": a})
    tests_b = role_tests_table(pd_concat([first.heads, second.heads]), {"a": b})
    np.testing.assert_allclose(tests_a.p_value, tests_b.p_value)
    np.testing.assert_allclose(tests_a.excess, tests_b.excess, equal_nan=True)


def pd_concat(frames):
    import pandas as pd

    return pd.concat(frames, ignore_index=True)
