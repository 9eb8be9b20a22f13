"""Softmax attention: the one dispatch between flash-attn, torch SDPA and the reference."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from ithaca.kernels._backend import flash_attn_usable
from ithaca.kernels.attention.reference import attention_reference

__all__ = ["attention", "attention_reference"]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, is_causal: bool = True,
              impl: Literal["auto", "flash", "sdpa", "reference"] = "auto") -> torch.Tensor:
    """Scaled dot-product attention over [b, s, h, d] tensors; the math is in reference.py.

    k and v may have fewer heads than q (grouped-query attention); h must be a multiple of h_kv.
    "auto" takes flash-attn on CUDA when installed, else torch SDPA.
    """
    if q.dim() != 4 or k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
        raise ValueError(f"attention: want q [b, s, h, d], k = v [b, s_k, h_kv, d]; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"attention: q heads {q.shape[2]} must be a multiple of kv heads {k.shape[2]}")
    if is_causal and q.shape[1] != k.shape[1]:
        raise ValueError(f"attention: causal needs as many queries as keys; got {q.shape[1]} and {k.shape[1]}")
    if impl == "auto":
        impl = "flash" if flash_attn_usable(q) else "sdpa"
    if impl == "reference":
        return attention_reference(q, k, v, is_causal=is_causal)
    if impl == "sdpa":
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=is_causal, enable_gqa=q.shape[2] != k.shape[2])
        return out.transpose(1, 2)  # [b, h, s, d] -> [b, s, h, d]
    if impl == "flash":
        from flash_attn import flash_attn_func  # optional GPU extra: import only when chosen

        return flash_attn_func(q, k, v, causal=is_causal)
    raise ValueError(f"attention: impl={impl!r}; choose 'auto', 'flash', 'sdpa' or 'reference'")
