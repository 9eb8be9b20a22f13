"""Softmax attention in plain PyTorch, fp32 math: the reference every fast path matches."""

from __future__ import annotations

import torch


def allowed_keys(q: torch.Tensor, k: torch.Tensor, *, is_causal: bool,
                 doc_ids: torch.Tensor | None) -> torch.Tensor | None:
    """Which keys each query may read, [b or 1, s_q, s_k] bool, or None when all of them.

    Causal aligns the last query with the last key; `doc_ids` [b, s] (queries and keys share one
    sequence) keeps each query inside its own packed document.
    """
    s_q, s_k = q.shape[1], k.shape[1]
    allowed = None
    if is_causal:
        allowed = torch.ones(s_q, s_k, dtype=torch.bool, device=q.device).tril(s_k - s_q)[None]
    if doc_ids is not None:
        same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
        allowed = same_doc if allowed is None else allowed & same_doc
    return allowed


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, is_causal: bool,
                        doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) [masked]) v.

    q [b, s, h, d]; k, v [b, s_k, h_kv, d] with h a multiple of h_kv (query head i reads kv
    head i // (h / h_kv)). `doc_ids` [b, s] (s == s_k) restricts attention to each document.
    Returns [b, s, h, d] in q's dtype.
    """
    group = q.shape[2] // k.shape[2]
    k = k.float().repeat_interleave(group, dim=2)
    v = v.float().repeat_interleave(group, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k) / q.shape[-1] ** 0.5
    allowed = allowed_keys(q, k, is_causal=is_causal, doc_ids=doc_ids)
    if allowed is not None:
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(dim=-1), v)
    return out.to(q.dtype)
