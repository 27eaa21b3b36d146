"""The README's Python blocks run as written, in order, in one namespace, and say what they claim:
``den.predict_eps`` is the ε the embedded model's v-output implies (checked from v by hand), and the
zero-ablated head changes it."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_python_blocks_run_as_written_and_predict_eps_is_the_eps_the_v_output_implies(
    tmp_path, monkeypatch
):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 3
    monkeypatch.chdir(tmp_path)  # the run block writes runs/quick here
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - the README's own code, as a user runs it
    import pandas as pd

    result = namespace[
        "result"
    ]  # the typed result of dc.run: what summary.json and the tables hold
    assert result.summary.to_dict() == __import__("json").loads(
        (tmp_path / "runs/quick/summary.json").read_text()
    )
    pd.testing.assert_frame_equal(
        result.table("head_metrics"),
        pd.read_parquet(tmp_path / "runs/quick/tables/head_metrics.parquet"),
    )
    den, x_t, t, eps_hat = (namespace[k] for k in ("den", "x_t", "t", "eps_hat"))
    assert den.prediction_type == "v_prediction"
    acp = den.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    import diffcircuit as dc

    with torch.no_grad(), dc.instrument(den.network, zero_heads=["mid_block.attentions.0:3"]):
        v = den.network(x_t, t).sample  # the raw output: v = √ᾱ·ε − √(1−ᾱ)·x₀
    expected = (1 - acp).sqrt() * x_t + acp.sqrt() * v  # ε = √(1−ᾱ)·x_t + √ᾱ·v
    torch.testing.assert_close(eps_hat, expected.float(), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(
            den.predict_eps(x_t, t), eps_hat, atol=1e-4
        )  # the ablation changed ε̂
    assert set(namespace["entropy"]) and all(
        e.shape[0] == len(x_t) for e in namespace["entropy"].values()
    )
    edited = __import__("copy").deepcopy(
        den.network
    )  # the README's user hook, by hand: the heads' columns of to_out
    from diffcircuit.instrument.registry import attention_modules

    modules = dict(attention_modules(edited))
    for layer, head, factor in (
        ("mid_block.attentions.0", 3, -1.0),
        ("up_blocks.1.attentions.0", 0, 2.0),
    ):
        d = modules[layer].inner_dim // modules[layer].heads
        with torch.no_grad():
            modules[layer].to_out[0].weight[:, head * d : (head + 1) * d] *= factor
    with torch.no_grad():
        v = edited(x_t, t).sample
    torch.testing.assert_close(
        namespace["eps_flipped"],
        ((1 - acp).sqrt() * x_t + acp.sqrt() * v).float(),
        rtol=1e-5,
        atol=1e-5,
    )
