"""Softmax attention: the one dispatch between flash-attn, torch SDPA and the reference."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from ithaca.kernels._backend import flash_attn_usable
from ithaca.kernels.attention.reference import allowed_keys, attention_reference

__all__ = ["allowed_keys", "attention", "attention_reference"]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, is_causal: bool = True,
              doc_ids: torch.Tensor | None = None,
              impl: Literal["auto", "flash", "sdpa", "reference"] = "auto") -> torch.Tensor:
    """Scaled dot-product attention over [b, s, h, d] tensors; the math is in reference.py.

    k and v may have fewer heads than q (grouped-query attention); h must be a multiple of h_kv.
    `doc_ids` [b, s] (int, non-decreasing along s) marks packed documents: no query reads
    another document's keys. "auto" takes flash-attn on CUDA when installed (its varlen kernel
    for documents), else torch SDPA (an explicit mask for documents).
    """
    if q.dim() != 4 or k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
        raise ValueError(f"attention: want q [b, s, h, d], k = v [b, s_k, h_kv, d]; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"attention: q heads {q.shape[2]} must be a multiple of kv heads {k.shape[2]}")
    if (is_causal or doc_ids is not None) and q.shape[1] != k.shape[1]:
        raise ValueError(f"attention: causal or document masks need as many queries as keys; got "
                         f"{q.shape[1]} and {k.shape[1]}")
    if doc_ids is not None and doc_ids.shape != q.shape[:2]:
        raise ValueError(f"attention: doc_ids must be [b, s] = {tuple(q.shape[:2])}; got {tuple(doc_ids.shape)}")
    if impl == "auto":
        impl = "flash" if flash_attn_usable(q) else "sdpa"
    if impl == "reference":
        return attention_reference(q, k, v, is_causal=is_causal, doc_ids=doc_ids)
    if impl == "sdpa":
        return _sdpa(q, k, v, is_causal, doc_ids)
    if impl == "flash":
        from ithaca.kernels.attention.flash_cuda import flash_attention  # optional GPU extra

        return flash_attention(q, k, v, is_causal=is_causal, doc_ids=doc_ids)
    raise ValueError(f"attention: impl={impl!r}; choose 'auto', 'flash', 'sdpa' or 'reference'")


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool,
          doc_ids: torch.Tensor | None) -> torch.Tensor:
    mask = None
    if doc_ids is not None:  # one boolean mask carries both rules
        mask, is_causal = allowed_keys(q, k, is_causal=is_causal, doc_ids=doc_ids)[:, None], False
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                         is_causal=is_causal, enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)  # [b, h, s, d] -> [b, s, h, d]
