"""Per-head attention statistics, computed inside the attention call.

Both paths return the attention output (what the layer goes on with; None when no values are given) and,
per image and head, the statistics asked for (``stats``, a subset of ``CAPTURE_STATISTICS``; the others are
not computed):

- ``entropy_nats``: mean over queries of H_i = −Σ_j p_ij log p_ij;
- ``perplexity``: mean over queries of exp(H_i), the effective number of attended keys;
- ``moments`` (when key features are given): M[g, f] = mean_i g_i · Σ_j p_ij f_j for every pair of
  channels (g on the query, f on the key) among a constant 1 followed by the given features. Locality, probe affinities and object/intensity
  similarity are all functions of these moments (see ``diffcircuit.metrics.attention``).

``naive`` materialises the probabilities (the reference). ``fused`` never does: it lays the keys, values and
features side by side in one fp32 buffer [k | v | f] (the values of one fused kernel call that also returns
the log-sum-exp), so that in one pass

    PK = P K,    out = P V,    A = P F,    H_i = logsumexp_j(s_ij) − scale · q_i · (PK)_i,

exactly (s_ij = scale · q_i · k_j), with memory linear in the number of keys. Where the kernel allows values
wider than queries and keys (CUDA's memory-efficient kernel) q and k go in as they are; ATen's CPU flash kernel
needs one head size, so q gets zero channels and the buffer itself serves as the keys (the zeros meet v and f).

Precision (``kernel_dtype``): under bf16/fp16 autocast, or with bf16/fp16 inputs, the kernel runs in that
precision as the model's own attention would (tensor-core kernels on a GPU); the kernels accumulate the
softmax and P·[k | v | f] in fp32 and return the log-sum-exp in fp32, and everything after them (q·PK, the
moments' products) is fp32. What the low precision costs is the rounding of q, k, f and of the kernel's output
(8 bits of mantissa in bf16): the mean entropy of a head is within ~0.01 nats of the fp32 reference on the
same inputs, its moments within ~1 % of their scale (tested). The naive path is always fp32: the reference.

``partner_moments`` scores the same attention against the features of *other* images (partners, for
the role null of ``metrics.roles``): for each partner j, M_j[g, f] = mean_i g_i^(j) Σ_k p_ik f_k^(j), with
g and f the partner's own feature maps (queries and keys share the grid). It materialises the
probabilities in chunks of images.
"""

from __future__ import annotations

from collections.abc import Collection

import torch
import torch.nn.functional as F

__all__ = [
    "CAPTURE_STATISTICS",
    "attention_stats_fused",
    "attention_stats_naive",
    "kernel_dtype",
    "partner_moments",
]

CAPTURE_STATISTICS = (
    "entropy_nats",
    "perplexity",
    "moments",
    "partner_moments",
)  # what a capture can record
_ENTROPY = ("entropy_nats", "perplexity")  # both come from the per-query entropy H_i


def _moments(weighted: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
    """M[g, f] = mean_i g_i A_if over channels [1, *features]: ``weighted`` [B, h, Q, C] (A = P F),
    ``feats`` [B, Q, C] -> [B, h, C+1, C+1]. The constant channel needs no attention: Σ_j p_ij = 1."""
    weighted = F.pad(weighted, (1, 0), value=1.0)  # A_i,one = Σ_j p_ij = 1
    feats = F.pad(feats, (1, 0), value=1.0)
    return torch.einsum("bhqf,bqg->bhgf", weighted, feats) / weighted.shape[2]


def _entropy_stats(h_query: torch.Tensor, stats: Collection[str]) -> dict[str, torch.Tensor]:
    """Entropy and perplexity ``[B, h]`` (those asked for) from the per-query entropy ``[B, h, Q]``."""
    out = {}
    if "entropy_nats" in stats:
        out["entropy_nats"] = h_query.mean(-1)
    if "perplexity" in stats:
        out["perplexity"] = h_query.exp().mean(-1)
    return out


def attention_stats_naive(
    query,
    key,
    value,
    mask,
    scale: float,
    feats: torch.Tensor | None,
    stats: Collection[str] = CAPTURE_STATISTICS,
):
    """Reference path: explicit softmax. Shapes: q [B, h, Q, d], k/v [B, h, K, d], feats [B, K, C]."""
    scores = (query.float() @ key.float().transpose(-1, -2)) * scale  # [B, h, Q, K]
    if mask is not None:
        scores = scores + mask.float()
    logp = torch.log_softmax(scores, dim=-1)  # [B, h, Q, K]
    probs = logp.exp()
    out = {}
    if any(name in stats for name in _ENTROPY):
        h_query = -torch.where(probs > 0, probs * logp, 0.0).sum(
            -1
        )  # [B, h, Q]; masked keys add 0, not nan
        out = _entropy_stats(h_query, stats)
    if feats is not None and "moments" in stats:
        out["moments"] = _moments(probs @ feats.float()[:, None], feats.float())
    return None if value is None else (probs @ value.float()).to(query.dtype), out


_LOW = (torch.bfloat16, torch.float16)


def kernel_dtype(query, key, value) -> torch.dtype:
    """The precision the fused kernel runs in: autocast's when autocast is on for the device (as the model's
    own attention would run), else the inputs' when all are bf16 or all fp16, else fp32."""
    kind = query.device.type
    if torch.is_autocast_enabled(kind) and torch.get_autocast_dtype(kind) in _LOW:
        return torch.get_autocast_dtype(kind)
    dtypes = {x.dtype for x in (query, key, value) if x is not None}
    return dtypes.pop() if len(dtypes) == 1 and dtypes <= set(_LOW) else torch.float32


def _value_buffer(key, value, feats, dtype) -> torch.Tensor:
    """The fused call's values ``[B, h, K, W]`` in ``dtype``, channels [k | v | f] (v, f when given; features
    [B, K, C] repeated for every head), written once, token-major as the projections lay out k and v."""
    b, h, n_k, d = key.shape
    pieces = [key.transpose(1, 2)] + (
        [] if value is None else [value.transpose(1, 2)]
    )  # [B, K, h, d]
    if feats is not None:
        pieces.append(feats[:, :, None].expand(b, n_k, h, feats.shape[-1]))  # [B, K, h, C]
    width = sum(p.shape[-1] for p in pieces)
    buffer = torch.empty(b, n_k, h, width, dtype=dtype, device=key.device)
    return torch.cat([p.to(dtype) for p in pieces], dim=-1, out=buffer).transpose(1, 2)


def _aligned(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """``x`` with zero channels appended up to a multiple of ``multiple`` (itself when it is one already)."""
    extra = -x.shape[-1] % multiple
    return F.pad(x, (0, extra)) if extra else x


def _fused_kernel(q, k, kv, scale: float, *, kv_as_keys: bool):
    """(out ``[B, h, Q, W]``, logsumexp ``[B, h, Q]`` in fp32) of queries q and keys k ``[..., d]`` over values kv,
    all three in one dtype (the output's).

    CPU: ATen's flash kernel for CPU, which needs one head size: q gets zero channels, and kv, whose first d
    channels are k, serves as the keys when ``kv_as_keys`` (its other channels finite, so they meet the zeros
    as 0); else k gets zero channels too. CUDA: the memory-efficient kernel, whose values may be wider than
    q and k; head sizes go in padded with zero channels to a multiple of 8 (the alignment its bf16/fp16
    kernels want; zeros change no score and the extra output channels are dropped); its log-sum-exp is
    padded along the query axis.
    """
    if q.device.type == "cpu":
        width, d = kv.shape[-1], q.shape[-1]
        keys = kv if kv_as_keys else F.pad(k, (0, width - d))
        out, lse, *_ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            F.pad(q, (0, width - d)), keys, kv, 0.0, False, scale=scale
        )
        return out, lse.float()
    out, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(
        _aligned(q, 8), _aligned(k, 8), _aligned(kv, 8), None, True, 0.0, False, scale=scale
    )
    return out[..., : kv.shape[-1]], lse[..., : q.shape[2]].float()


def _fused_moments(
    out: torch.Tensor, feats: torch.Tensor, mean_feats: torch.Tensor
) -> torch.Tensor:
    """``_moments`` of the kernel output's last C channels (A = P F; ``out`` [B, h, Q, W]), as one product of the
    query-side channels [1, *features] with every output channel in the kernel's token-major layout (no copy of
    A), then the feature columns picked; ``mean_feats`` [B, C] is the constant column (Σ_j p_ij = 1)."""
    b, h, n_q, width = out.shape
    c = feats.shape[-1]
    per_token = out.transpose(1, 2).reshape(
        b, n_q, h * width
    )  # [B, Q, h*W]: a view of what the kernels write
    summed = torch.bmm(F.pad(feats, (1, 0), value=1.0).transpose(1, 2), per_token)  # [B, 1+C, h*W]
    moments = out.new_empty(b, h, c + 1, c + 1)
    moments[..., :, 1:] = summed.view(b, c + 1, h, width)[..., width - c :].transpose(1, 2) / n_q
    moments[..., 1:, 0] = mean_feats[:, None]  # M[g, 1] = mean_i g_i
    moments[..., 0, 0] = 1.0
    return moments


def attention_stats_fused(
    query,
    key,
    value,
    mask,
    scale: float,
    feats: torch.Tensor | None,
    stats: Collection[str] = CAPTURE_STATISTICS,
):
    """One fused attention call over the buffer [k | v | f]; same results as the naive path to ~1e-5.

    With an attention mask it falls back to the naive path (masks occur only with padded text).
    """
    if mask is not None or query.device.type not in ("cpu", "cuda"):
        return attention_stats_naive(query, key, value, mask, scale, feats, stats)
    feats = feats.float() if feats is not None and "moments" in stats else None
    d, dtype = query.shape[-1], kernel_dtype(query, key, value)
    kv = _value_buffer(key, value, feats, dtype)  # [B, h, K, d (+ d) (+ C)]
    mean_feats = None if feats is None else feats.mean(1)  # [B, C]; a non-finite feature shows here
    # on the CPU a non-finite feature would meet q's zero channels (a non-finite v spoils its head's output anyway)
    finite = mean_feats is None or query.device.type != "cpu" or bool(mean_feats.isfinite().all())
    out, lse = _fused_kernel(
        query.to(dtype), key.to(dtype), kv, scale, kv_as_keys=finite
    )  # [B, h, Q, W], [B, h, Q]
    result = {}
    if any(name in stats for name in _ENTROPY):
        # q_i · (PK)_i  [B, h, Q] in fp32 (in place when the output is fp32: PK is not needed after)
        q_pk = out[..., :d].float().mul_(query.float()).sum(-1)
        result = _entropy_stats(torch.sub(lse, q_pk, alpha=scale), stats)  # H_i
    if feats is not None:  # the feature channels only, widened to fp32 when the kernel ran lower
        weighted = out if dtype == torch.float32 else out[..., -feats.shape[-1] :].float()
        result["moments"] = _fused_moments(weighted, feats, mean_feats)
    return None if value is None else out[..., d : 2 * d].to(query.dtype), result


def partner_moments(
    query,
    key,
    mask,
    scale: float,
    partners: torch.Tensor,
    *,
    paired: tuple[int, ...] = (),
    max_elements: int = 1 << 23,
):
    """Each head's attention scored against every partner's features: q [B, h, Q, d], k [B, h, K, d], partners
    [n, K, C] (their maps on this layer's grid, Q = K) -> [B, h, n, C+1, C+1] over channels [1, *C].

    Filled: M[1, f] = Σ_k ā_k f_k (ā: the attention each key receives, averaged over queries), M[g, 1] = mean_i
    g_i, and M[c, c] = mean_i c_i Σ_k p_ik c_k for the channels in ``paired``; the rest is NaN. Only the paired
    channels need the full attention matrix against every partner, so only they cost Q·K per partner.
    """
    b, h, n_q, _ = query.shape
    n, n_k, c = partners.shape
    feats = partners.float()
    pairs = list(paired)
    flat = feats[:, :, pairs].permute(1, 0, 2).reshape(n_k, n * len(pairs))  # [K, n*P]
    out = torch.full((b, h, n, c + 1, c + 1), float("nan"), device=query.device)
    out[..., 0, 0] = 1.0
    out[..., 1:, 0] = feats.mean(1)  # [n, C]: query-side means need no attention
    diagonal = (
        torch.tensor(pairs, dtype=torch.long, device=query.device) + 1
    )  # M[c, c] of the paired channels
    step = max(1, max_elements // (h * n_q * max(n_k, n * max(1, len(pairs)))))
    for lo in range(0, b, step):
        hi = min(b, lo + step)
        scores = (
            query[lo:hi].float() @ key[lo:hi].float().transpose(-1, -2)
        ) * scale  # [b, h, Q, K]
        if mask is not None:
            scores = scores + (mask if mask.shape[0] == 1 else mask[lo:hi]).float()
        probs = scores.softmax(-1)
        out[lo:hi, :, :, 0, 1:] = torch.einsum("bhk,nkc->bhnc", probs.mean(2), feats)  # Σ_k ā_k f_k
        if pairs:
            attended = (probs @ flat).view(
                hi - lo, h, n_q, n, len(pairs)
            )  # Σ_k p_ik c_k^(j)  [b, h, Q, n, P]
            own = feats[
                :, :, pairs
            ]  # [n, Q, P]: the partner's query-side values of the same channels
            out[lo:hi, :, :, diagonal, diagonal] = (
                torch.einsum("bhqnp,nqp->bhnp", attended, own) / n_q
            )
    return out
