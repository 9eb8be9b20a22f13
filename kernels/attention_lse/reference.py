"""Softmax attention that also returns its log-sum-exp, and the backward that takes them back.

This is the block step of ring attention (DESIGN.md, "Ring attention"): partial results are merged
by their log-sum-exp, and each block's backward uses the *merged* output and log-sum-exp:

    P = exp(scale * q k^T - lse)       dV = P^T dO        D = rowsum(dO * O)
    dS = P * (dO V^T - D)              dQ = scale * dS K  dK = scale * dS^T Q

Layout [b, s, h, d]; k, v may have fewer heads (h a multiple of h_kv); lse is [b, h, s] fp32.
`is_causal` needs s_q == s_k (the diagonal block of a ring step). `allowed` [b, s_q, s_k] bool
further limits which keys each query reads (packed documents); a query with no key left in a
block gets out 0 and lse -inf, which the log-sum-exp merge then ignores.
"""

from __future__ import annotations

import torch


def _scores(q: torch.Tensor, k: torch.Tensor, is_causal: bool, scale: float,
            allowed: torch.Tensor | None) -> torch.Tensor:
    group = q.shape[2] // k.shape[2]
    k = k.float().repeat_interleave(group, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k) * scale
    if is_causal:
        future = torch.ones(q.shape[1], k.shape[1], dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    if allowed is not None:
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    return scores


def _probs(scores: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """exp(scores - lse), with rows whose lse is -inf (no key at all) giving 0 rather than NaN."""
    return torch.exp(scores - torch.where(torch.isinf(lse), 0.0, lse)[..., None])


def attention_lse_fwd_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, is_causal: bool,
                                scale: float, allowed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (out [b, s, h, d] in q's dtype, lse [b, h, s] fp32)."""
    scores = _scores(q, k, is_causal, scale, allowed)
    lse = torch.logsumexp(scores, dim=-1)
    group = q.shape[2] // k.shape[2]
    probs = _probs(scores, lse)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v.float().repeat_interleave(group, dim=2))
    return out.to(q.dtype), lse


def attention_lse_bwd_reference(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                out: torch.Tensor, lse: torch.Tensor, *, is_causal: bool, scale: float,
                                allowed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of one block given the final out and lse -> (dq, dk, dv) fp32, shaped like q, k, v."""
    b, s_k, h_kv, d = k.shape
    group = q.shape[2] // h_kv
    probs = _probs(_scores(q, k, is_causal, scale, allowed), lse)  # [b, h, s_q, s_k]
    dout32 = dout.float()
    v_rep = v.float().repeat_interleave(group, dim=2)
    dv = torch.einsum("bhqk,bqhd->bkhd", probs, dout32)
    row_dot = (dout32 * out.float()).sum(-1).transpose(1, 2)  # D: [b, h, s_q]
    dscores = probs * (torch.einsum("bqhd,bkhd->bhqk", dout32, v_rep) - row_dot[..., None])
    dq = torch.einsum("bhqk,bkhd->bqhd", dscores, k.float().repeat_interleave(group, dim=2)) * scale
    dk = torch.einsum("bhqk,bqhd->bkhd", dscores, q.float()) * scale
    # kv head j served `group` query heads: its gradient is their sum
    return dq, dk.view(b, s_k, h_kv, group, d).sum(3), dv.view(b, s_k, h_kv, group, d).sum(3)
