"""The input check every sequence-parallel attention function makes at its entry."""

from __future__ import annotations

import torch


def check_attention_inputs(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           doc_ids: torch.Tensor | None) -> None:
    """q [b, s, h, d], k = v [b, s, h_kv, d] with h a multiple of h_kv, doc_ids None or [b, s];
    raises ValueError naming `name` and the shapes otherwise."""
    if q.dim() != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"{name}: want q [b, s, h, d], k = v [b, s, h_kv, d]; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"{name}: q heads {q.shape[2]} must be a multiple of kv heads {k.shape[2]}")
    if doc_ids is not None and doc_ids.shape != q.shape[:2]:
        raise ValueError(f"{name}: doc_ids must be [b, s] = {tuple(q.shape[:2])}; got {tuple(doc_ids.shape)}")
