"""The one input check and the one grouped-query helper of every attention kernel and every
sequence-parallel attention method."""

from __future__ import annotations

import torch


def check_attention_inputs(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                           doc_ids: torch.Tensor | None = None, kv_doc_ids: torch.Tensor | None = None,
                           same_length: bool = False) -> None:
    """q [b, s, h, d], k = v [b, s_k, h_kv, d] in q's dtype, h a multiple of h_kv; `doc_ids` [b, s] and
    `kv_doc_ids` [b, s_k] (given together, or doc_ids alone when s_k == s); `same_length`: s_k must
    equal s (sequence-parallel methods, where q, k and v are one rank's part of one sequence).
    Raises ValueError naming `name` and the shapes otherwise."""
    if q.dim() != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"{name}: want q [b, s, h, d], k = v [b, s_k, h_kv, d]; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if same_length and q.shape[1] != k.shape[1]:
        raise ValueError(f"{name}: q, k and v must hold the same tokens; got lengths {q.shape[1]} and {k.shape[1]}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"{name}: q heads {q.shape[2]} must be a multiple of kv heads {k.shape[2]}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"{name}: q, k and v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if doc_ids is not None and doc_ids.shape != q.shape[:2]:
        raise ValueError(f"{name}: doc_ids must be [b, s] = {tuple(q.shape[:2])}; got {tuple(doc_ids.shape)}")
    if kv_doc_ids is not None and (doc_ids is None or kv_doc_ids.shape != k.shape[:2]):
        raise ValueError(f"{name}: kv_doc_ids must be [b, s_k] = {tuple(k.shape[:2])} and come with doc_ids; got "
                         f"{tuple(kv_doc_ids.shape)}")
    if doc_ids is not None and kv_doc_ids is None and q.shape[1] != k.shape[1]:
        raise ValueError(f"{name}: with {q.shape[1]} queries and {k.shape[1]} keys, give the keys' documents "
                         "as kv_doc_ids")


def repeat_kv_heads(x: torch.Tensor, repeat: int) -> torch.Tensor:
    """[b, s, h_kv, d] -> [b, s, h_kv * repeat, d], copies of kv head j adjacent: query head i reads
    kv head i // (h / h_kv), and after a Ulysses head scatter the copies land beside their queries."""
    return x.repeat_interleave(repeat, dim=2) if repeat > 1 else x
