"""flash-attn 2 (CUDA, fp16/bf16; the optional `gpu` extra). Packed documents go through its
varlen kernel; the ring step's forward and backward use its kernels that return the log-sum-exp.
Never run here: no machine this project has had held flash-attn (see bench/RESULTS.md)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from flash_attn import flash_attn_func, flash_attn_varlen_func
from flash_attn.flash_attn_interface import _flash_attn_backward, _flash_attn_forward


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


def attention_lse_fwd_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, is_causal: bool,
                            scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse, _, _ = _flash_attn_forward(q, k, v, 0.0, scale, is_causal, -1, -1, 0.0, None, False)
    return out, lse


def attention_lse_bwd_flash(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            out: torch.Tensor, lse: torch.Tensor, *, is_causal: bool,
                            scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    # flash-attn reads the merged out/lse, in q's dtype and contiguous
    _flash_attn_backward(dout.contiguous(), q, k, v, out.to(q.dtype).contiguous(), lse.contiguous(), dq, dk, dv,
                         0.0, scale, is_causal, -1, -1, 0.0, None, False, None)
    return dq.float(), dk.float(), dv.float()
