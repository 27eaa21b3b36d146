"""Head roles against planted ground truth on the embedded model (the role null of ``protocol.roles``).

- edge head: one head forced to attend to each image's highest-gradient keys, on synthetic shapes, faces and
  non-faces: it must be an edge head on each;
- positional head: one head forced to look at the grid's centre, on images whose textured patch always sits in
  the centre (content and position coincide): a high raw texture affinity and no content role;
- the model's own heads on those centred images: how many heads the raw thresholds would label, and how many
  content roles the null supports (it should be none);
- random heads: every head forced to attend at random: the p-values' Kolmogorov–Smirnov p against uniform.

    .venv/bin/python benchmarks/planted_roles.py [--n 24] [--t 500]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from scipy import stats

import diffcircuit as dc
from diffcircuit.discovery.planted import centre_logits, edge_logits, forcing, random_logits
from diffcircuit.metrics.observe import observe_with_null
from diffcircuit.metrics.roles import CONTENT_ROLES
from diffcircuit.protocol.roles import head_roles_table, permutation_table, role_tests_table

LAYER, HEAD = "down_blocks.1.attentions.0", 3


def _roles(den, images, masks, t, permutations):
    found = observe_with_null(den, images, timesteps=[t], masks=masks)
    tests = role_tests_table(
        found.heads,
        {"a": permutation_table(found.blocks, seed=0, dataset="a", n_permutations=permutations)},
    )
    return found, tests, head_roles_table(found.heads, tests)


def _centred(n: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    images = np.zeros((n, 3, 32, 32), dtype=np.float32)
    for i in range(n):
        images[i, :, 10:22, 10:22] = rng.uniform(-0.9, 0.9, size=(12, 12))
    return images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=24)
    parser.add_argument("--t", type=int, default=500)
    parser.add_argument("--permutations", type=int, default=4999)
    args = parser.parse_args()
    den = dc.load_denoiser()
    one = lambda frame: frame[(frame.layer == LAYER) & (frame["head"] == HEAD)]  # noqa: E731
    hits = 0
    for spec in ("synthetic", "faces", "nonfaces"):
        s = dc.model_images(den, spec, n=args.n)
        with forcing(den.network, edge_logits, {LAYER: [HEAD]}):
            _, tests, roles = _roles(den, s.images, s.masks, args.t, args.permutations)
        edge = one(tests[tests.probe == "edge"]).iloc[0]
        role = one(roles).role.item()
        hits += role == "edge"
        print(
            f"edge head on {spec}: role {role}; edge excess {edge.excess:.3f} [{edge.ci_low:.3f}, {edge.ci_high:.3f}], "
            f"q {edge.q_value:.2g}"
        )
    centred = _centred(args.n)
    with forcing(den.network, centre_logits, {LAYER: [HEAD]}):
        found, tests, roles = _roles(den, centred, None, args.t, args.permutations)
    head = one(roles).iloc[0]
    print(
        f"positional head on centred patches: raw texture affinity {one(found.heads).texture_affinity.mean():.2f}, "
        f"role {head.role} ({head.role_basis}), raw only: {head.raw_only}"
    )
    _, _, roles = _roles(den, centred, None, args.t, args.permutations)
    raw = int(roles.raw_only.str.len().gt(0).sum())
    content = int(roles.role.isin(CONTENT_ROLES).sum())
    print(
        f"model's own heads on centred patches: {raw} would pass a raw threshold; {content} content roles claimed"
    )
    s = dc.model_images(den, "synthetic", n=args.n)
    every = {i.layer: list(range(i.heads)) for i in dc.HeadRegistry.from_model(den.network).layers}
    with forcing(den.network, random_logits, every, torch.Generator().manual_seed(0)):
        _, tests, roles = _roles(den, s.images, s.masks, args.t, 999)
    ks = {p: stats.kstest(g.p_value.dropna(), "uniform").pvalue for p, g in tests.groupby("probe")}
    print(
        "random heads: KS p against uniform per probe "
        + ", ".join(f"{p} {v:.2f}" for p, v in ks.items())
        + f"; content roles {int(roles.role.isin(CONTENT_ROLES).sum())}"
    )
    print(f"edge_head_found: {hits}/3")
    print(f"false_content_roles_centred: {content}")


if __name__ == "__main__":
    main()
