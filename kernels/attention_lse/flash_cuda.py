"""The block step on flash-attn 2 (CUDA, fp16/bf16), whose kernels return the log-sum-exp."""

from __future__ import annotations

import torch
from flash_attn.flash_attn_interface import _flash_attn_backward, _flash_attn_forward


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
