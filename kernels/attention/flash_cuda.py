"""flash-attn 2 (CUDA, fp16/bf16); packed documents go through its varlen kernel."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from flash_attn import flash_attn_func, flash_attn_varlen_func


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, is_causal: bool,
                    doc_ids: torch.Tensor | None) -> torch.Tensor:
    if doc_ids is None:
        return flash_attn_func(q, k, v, causal=is_causal)
    b, s, h, d = q.shape
    # Every (batch row, document) pair becomes one varlen sequence: a new one starts where the
    # document id changes or a row begins.
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    start_index = starts.flatten().nonzero().flatten()
    cu_seqlens = F.pad(start_index, (0, 1), value=b * s).to(torch.int32)
    max_len = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    out = flash_attn_varlen_func(q.reshape(b * s, h, d), k.reshape(b * s, -1, d), v.reshape(b * s, -1, d),
                                 cu_seqlens, cu_seqlens, max_len, max_len, causal=is_causal)
    return out.view(b, s, h, d)
