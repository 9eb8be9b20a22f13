"""Softmax attention in plain PyTorch, fp32 math: the reference every fast path matches."""

from __future__ import annotations

import torch


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, is_causal: bool) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) [+ causal mask]) v.

    q [b, s, h, d]; k, v [b, s_k, h_kv, d] with h a multiple of h_kv (query head i reads kv
    head i // (h / h_kv)). Returns [b, s, h, d] in q's dtype. Causal aligns the last query
    with the last key.
    """
    group = q.shape[2] // k.shape[2]
    k = k.float().repeat_interleave(group, dim=2)
    v = v.float().repeat_interleave(group, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k) / q.shape[-1] ** 0.5
    if is_causal:
        s_q, s_k = q.shape[1], k.shape[1]
        future = torch.ones(s_q, s_k, dtype=torch.bool, device=q.device).triu(s_k - s_q + 1)
        scores = scores.masked_fill(future, float("-inf"))
    out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(dim=-1), v)
    return out.to(q.dtype)
