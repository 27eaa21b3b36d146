"""Per-head attention statistics, computed inside the attention call.

Both paths return the attention output (what the layer goes on with) and, per image and head,

- ``entropy_nats``: mean over queries of H_i = −Σ_j p_ij log p_ij;
- ``perplexity``: mean over queries of exp(H_i), the effective number of attended keys;
- ``moments`` (when key features are given): M[g, f] = mean_i g_i · Σ_j p_ij f_j for every pair of
  channels (g on the query, f on the key) among a constant 1 followed by the given features. Locality, probe affinities and object/intensity
  similarity are all functions of these moments (see ``diffcircuit.metrics.attention``).

``naive`` materialises the probabilities (the reference). ``fused`` never does: it appends the
keys and the features to the values and calls a fused kernel that also returns the log-sum-exp,
so that in one pass

    out   = P V,    PK = P K,    A = P F,    H_i = logsumexp_j(s_ij) − scale · q_i · (PK)_i,

exactly (s_ij = scale · q_i · k_j), with memory linear in the number of keys.

``partner_moments`` scores the same attention against the features of *other* images (partners, for
the role null of ``metrics.roles``): for each partner j, M_j[g, f] = mean_i g_i^(j) Σ_k p_ik f_k^(j), with
g and f the partner's own feature maps (queries and keys share the grid). It materialises the
probabilities in chunks of images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["attention_stats_fused", "attention_stats_naive", "partner_moments"]


def _moments(weighted: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
    """M[g, f] = mean_i g_i A_if over channels [1, *features]: ``weighted`` [B, h, Q, C] (A = P F),
    ``feats`` [B, Q, C] -> [B, h, C+1, C+1]. The constant channel needs no attention: Σ_j p_ij = 1."""
    weighted = F.pad(weighted, (1, 0), value=1.0)  # A_i,one = Σ_j p_ij = 1
    feats = F.pad(feats, (1, 0), value=1.0)
    return torch.einsum("bhqf,bqg->bhgf", weighted, feats) / weighted.shape[2]


def attention_stats_naive(query, key, value, mask, scale: float, feats: torch.Tensor | None):
    """Reference path: explicit softmax. Shapes: q [B, h, Q, d], k/v [B, h, K, d], feats [B, K, C]."""
    scores = (query.float() @ key.float().transpose(-1, -2)) * scale  # [B, h, Q, K]
    if mask is not None:
        scores = scores + mask.float()
    logp = torch.log_softmax(scores, dim=-1)  # [B, h, Q, K]
    probs = logp.exp()
    h_query = -torch.where(probs > 0, probs * logp, 0.0).sum(-1)  # [B, h, Q]; masked keys add 0, not nan
    stats = {"entropy_nats": h_query.mean(-1), "perplexity": h_query.exp().mean(-1)}
    if feats is not None:
        stats["moments"] = _moments(probs @ feats.float()[:, None], feats.float())
    return (probs @ value.float()).to(query.dtype), stats


def _fused_kernel(q, k, v, scale):
    """(out, logsumexp) from a fused kernel; q, k, v share one head size here.

    CPU: ATen's flash kernel for CPU. CUDA: the memory-efficient kernel (fp32-capable), whose
    log-sum-exp is padded along the query axis. Other devices: the naive path is used instead.
    """
    if q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)
    out, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, False, scale=scale)
    return out, lse[..., : q.shape[2]]


def attention_stats_fused(query, key, value, mask, scale: float, feats: torch.Tensor | None):
    """One fused attention call over padded buffers; same results as the naive path to ~1e-5.

    With an attention mask it falls back to the naive path (masks occur only with padded text).
    """
    if mask is not None or query.device.type not in ("cpu", "cuda"):
        return attention_stats_naive(query, key, value, mask, scale, feats)
    b, h, n_q, d = query.shape
    n_k = key.shape[2]
    n_f = 0 if feats is None else feats.shape[-1]
    width = 2 * d + n_f  # value channels: [ v | k | features ]
    dtype = torch.float32
    q_pad = F.pad(query.to(dtype), (0, width - d))  # zero channels add nothing to q·k
    k_pad = F.pad(key.to(dtype), (0, width - d))
    v_ext = torch.empty(b, h, n_k, width, dtype=dtype, device=query.device)
    v_ext[..., :d] = value
    v_ext[..., d : 2 * d] = key
    if feats is not None:
        v_ext[..., 2 * d :] = feats.to(dtype)[:, None]
    out, lse = _fused_kernel(q_pad, k_pad, v_ext, scale)  # [B, h, Q, width], [B, h, Q]
    mean_score = scale * (query.float() * out[..., d : 2 * d]).sum(-1)  # Σ_j p_ij s_ij  [B, h, Q]
    h_query = lse.float() - mean_score
    stats = {"entropy_nats": h_query.mean(-1), "perplexity": h_query.exp().mean(-1)}
    if feats is not None:
        stats["moments"] = _moments(out[..., 2 * d :], feats.float())
    return out[..., :d].to(query.dtype), stats



def partner_moments(query, key, mask, scale: float, partners: torch.Tensor, *, paired: tuple[int, ...] = (),
                    max_elements: int = 1 << 23):
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
    step = max(1, max_elements // (h * n_q * max(n_k, n * max(1, len(pairs)))))
    for lo in range(0, b, step):
        hi = min(b, lo + step)
        scores = (query[lo:hi].float() @ key[lo:hi].float().transpose(-1, -2)) * scale  # [b, h, Q, K]
        if mask is not None:
            scores = scores + (mask if mask.shape[0] == 1 else mask[lo:hi]).float()
        probs = scores.softmax(-1)
        out[lo:hi, :, :, 0, 1:] = torch.einsum("bhk,nkc->bhnc", probs.mean(2), feats)  # Σ_k ā_k f_k
        if pairs:
            attended = (probs @ flat).view(hi - lo, h, n_q, n, len(pairs))  # Σ_k p_ik c_k^(j)  [b, h, Q, n, P]
            own = feats[:, :, pairs]  # [n, Q, P]: the partner's query-side values of the same channels
            diag = torch.einsum("bhqnp,nqp->bhnp", attended, own) / n_q
            for k, channel in enumerate(pairs):
                out[lo:hi, :, :, channel + 1, channel + 1] = diag[..., k]
    return out
