"""Fused capture against the naive reference, and both on hand-built attention patterns."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from diffcircuit.instrument import capture
from diffcircuit.instrument.capture import (
    attention_stats_fused,
    attention_stats_naive,
    kernel_dtype,
)


def _random(b=2, h=3, q=20, k=20, d=8, c=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(*s, generator=g) for s in ((b, h, q, d), (b, h, k, d), (b, h, k, d), (b, k, c))
    ]


@pytest.mark.parametrize("scale_up", [1.0, 6.0])  # ordinary and very peaked attention
def test_fused_matches_naive(scale_up):
    q, k, v, f = _random()
    q = q * scale_up
    out_n, st_n = attention_stats_naive(q, k, v, None, 8**-0.5, f)
    out_f, st_f = attention_stats_fused(q, k, v, None, 8**-0.5, f)
    torch.testing.assert_close(out_f, out_n, atol=1e-5, rtol=0)
    for name in ("entropy_nats", "perplexity", "moments"):
        torch.testing.assert_close(st_f[name], st_n[name], atol=1e-4, rtol=1e-4)


def test_fused_output_equals_sdpa_and_no_features_is_fine():
    q, k, v, _ = _random(q=7, k=11)
    out, stats = attention_stats_fused(q, k, v, None, 8**-0.5, None)
    torch.testing.assert_close(
        out, torch.nn.functional.scaled_dot_product_attention(q, k, v), atol=1e-6, rtol=0
    )
    assert "moments" not in stats and stats["entropy_nats"].shape == (2, 3)


@pytest.mark.parametrize("stats_fn", [attention_stats_naive, attention_stats_fused])
def test_uniform_and_one_hot_rows(stats_fn):
    n = 16
    v = torch.randn(1, 1, n, n)
    zeros = torch.zeros(1, 1, n, n)
    _, uniform = stats_fn(zeros, torch.eye(n)[None, None], v, None, 0.25, None)
    assert uniform["entropy_nats"].item() == pytest.approx(math.log(n), abs=1e-5)
    assert uniform["perplexity"].item() == pytest.approx(n, rel=1e-5)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    q = 400.0 * torch.eye(n)[perm][None, None]  # query i scores key perm[i] at 100, the rest at 0
    out, one_hot = stats_fn(q, torch.eye(n)[None, None], v, None, 0.25, None)
    assert one_hot["entropy_nats"].item() == pytest.approx(0.0, abs=1e-4)
    torch.testing.assert_close(out[0, 0], v[0, 0, perm], atol=1e-5, rtol=0)


@pytest.mark.parametrize("stats_fn", [attention_stats_naive, attention_stats_fused])
def test_only_the_statistics_asked_for_are_computed_and_equal_plain_softmax(stats_fn):
    q, k, v, f = _random()
    p = torch.softmax(q.double() @ k.double().transpose(-1, -2) * 8**-0.5, -1)  # [B, h, Q, K]
    out, only_entropy = stats_fn(q, k, v, None, 8**-0.5, f, ("entropy_nats",))
    assert set(only_entropy) == {"entropy_nats"}
    torch.testing.assert_close(
        only_entropy["entropy_nats"],
        torch.special.entr(p).sum(-1).mean(-1).float(),
        atol=1e-5,
        rtol=0,
    )
    torch.testing.assert_close(out, (p @ v.double()).float(), atol=1e-5, rtol=0)
    no_output, only_moments = stats_fn(
        q, k, None, None, 8**-0.5, f, ("moments",)
    )  # no values: no output
    ones = F.pad(
        f.double(), (1, 0), value=1.0
    )  # [B, K, 1 + C]; queries and keys share the positions here
    expected = torch.einsum("bhqk,bkf,bqg->bhgf", p, ones, ones) / q.shape[2]
    assert no_output is None and set(only_moments) == {"moments"}
    torch.testing.assert_close(only_moments["moments"], expected.float(), atol=1e-5, rtol=1e-5)


def test_a_nan_feature_spoils_its_own_moments_only():
    q, k, v, f = _random()
    f[0, 3, 1] = math.nan  # image 0, key 3, channel 1
    out_f, st_f = attention_stats_fused(q, k, v, None, 8**-0.5, f)
    out_n, st_n = attention_stats_naive(q, k, v, None, 8**-0.5, f)
    torch.testing.assert_close(out_f, F.scaled_dot_product_attention(q, k, v), atol=1e-6, rtol=0)
    torch.testing.assert_close(st_f["entropy_nats"], st_n["entropy_nats"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(
        st_f["moments"], st_n["moments"], atol=1e-4, rtol=1e-4, equal_nan=True
    )
    assert st_f["moments"][1].isfinite().all() and st_f["moments"][0, :, 0, 0].isfinite().all()


def test_masked_attention_uses_the_reference_path():
    q, k, v, f = _random(q=6, k=6)
    mask = torch.zeros(2, 3, 6, 6)
    mask[..., -2:] = -math.inf
    out_f, st_f = attention_stats_fused(q, k, v, mask, 8**-0.5, f)
    out_n, st_n = attention_stats_naive(q, k, v, mask, 8**-0.5, f)
    torch.testing.assert_close(st_f["entropy_nats"], st_n["entropy_nats"])
    assert (st_n["entropy_nats"] <= math.log(4) + 1e-5).all()


def _spy_kernel(monkeypatch) -> list[torch.dtype]:
    """The dtypes the fused kernel is called with, in call order."""
    seen, kernel = [], capture._fused_kernel

    def spy(q, k, kv, *args, **kwargs):
        seen.append(kv.dtype)
        assert q.dtype == k.dtype == kv.dtype
        return kernel(q, k, kv, *args, **kwargs)

    monkeypatch.setattr(capture, "_fused_kernel", spy)
    return seen


def _assert_close_to_reference(q, k, v, f, atol):
    """Fused statistics of low-precision inputs against the fp32 naive path on the same (rounded) values, and
    the output against the model's own attention in that precision."""
    out, st = attention_stats_fused(q, k, v, None, 8**-0.5, f)
    ref_out, ref = attention_stats_naive(q.float(), k.float(), v.float(), None, 8**-0.5, f.float())
    for name in ("entropy_nats", "perplexity", "moments"):
        assert st[name].dtype == torch.float32
    torch.testing.assert_close(st["entropy_nats"], ref["entropy_nats"], atol=atol, rtol=0)
    torch.testing.assert_close(st["perplexity"], ref["perplexity"], atol=0, rtol=atol)
    torch.testing.assert_close(st["moments"], ref["moments"], atol=atol, rtol=0)
    torch.testing.assert_close(out.float(), ref_out, atol=4 * atol, rtol=0)  # [B, h, Q, d]
    torch.testing.assert_close(
        out, F.scaled_dot_product_attention(q, k, v).to(out.dtype), atol=4 * atol, rtol=0
    )


@pytest.mark.parametrize("scale_up", [1.0, 6.0])  # ordinary and very peaked attention
def test_bf16_inputs_run_the_kernel_in_bf16_and_stay_close_to_the_fp32_reference(
    monkeypatch, scale_up
):
    seen = _spy_kernel(monkeypatch)
    q, k, v, f = _random(q=64, k=64, c=7)
    q, k, v = (q * scale_up).bfloat16(), (k + 1.5).bfloat16(), v.bfloat16()
    f = f.sigmoid()  # features on [0, 1], as the probe maps are
    _assert_close_to_reference(q, k, v, f, atol=0.01)
    assert seen == [torch.bfloat16]


def test_autocast_decides_the_kernel_precision_and_fp32_stays_exact(monkeypatch):
    seen = _spy_kernel(monkeypatch)
    q, k, v, f = _random()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert kernel_dtype(q, k, v) == torch.bfloat16  # fp32 inputs, as a qk-norm leaves them
        attention_stats_fused(q, k, v, None, 8**-0.5, f)
    assert kernel_dtype(q, k.bfloat16(), v) == torch.float32  # mixed inputs, no autocast: fp32
    assert kernel_dtype(q.half(), k.half(), v.half()) == torch.float16
    attention_stats_fused(q, k, v, None, 8**-0.5, f)
    assert seen == [torch.bfloat16, torch.float32]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_kernel_on_cuda_with_unaligned_widths(monkeypatch, dtype):
    seen = _spy_kernel(monkeypatch)
    q, k, v, f = (x.cuda() for x in _random(q=64, k=64, c=7))  # W = 8 + 8 + 7: padded to 24
    _assert_close_to_reference(q.to(dtype), k.to(dtype), v.to(dtype), f.sigmoid(), atol=0.01)
    assert seen == [dtype]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fused_matches_naive_on_cuda():
    q, k, v, f = (x.cuda() for x in _random(q=64, k=64))
    out_n, st_n = attention_stats_naive(q, k, v, None, 8**-0.5, f)
    out_f, st_f = attention_stats_fused(q, k, v, None, 8**-0.5, f)
    torch.testing.assert_close(out_f, out_n, atol=1e-4, rtol=0)
    for name in ("entropy_nats", "perplexity", "moments"):
        torch.testing.assert_close(st_f[name], st_n[name], atol=1e-3, rtol=1e-3)
