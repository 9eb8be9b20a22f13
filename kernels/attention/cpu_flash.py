"""The block step on PyTorch's CPU flash-attention kernels, which return the log-sum-exp (no masks
but causal, and causal only with as many queries as keys)."""

from __future__ import annotations

import torch

from ithaca.kernels.attention.shapes import repeat_kv_heads


def _heads_first(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
    group = q.shape[2] // k.shape[2]  # the kernel wants as many kv heads as q heads
    return tuple(t.transpose(1, 2) for t in (q, repeat_kv_heads(k, group), repeat_kv_heads(v, group)))


def attention_lse_fwd_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, is_causal: bool,
                          scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        *_heads_first(q, k, v), 0.0, is_causal, scale=scale)
    return out.transpose(1, 2), lse.float()


def attention_lse_bwd_cpu(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          out: torch.Tensor, lse: torch.Tensor, *, is_causal: bool,
                          scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, s_k, h_kv, d = k.shape
    group = q.shape[2] // h_kv
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout.transpose(1, 2).contiguous(), *_heads_first(q, k, v), out.transpose(1, 2).contiguous(),
        lse, 0.0, is_causal, scale=scale)  # the kernel's log-sum-exp is fp32 in every dtype
    dq, dk, dv = (t.transpose(1, 2).float() for t in (dq, dk, dv))
    return dq, dk.reshape(b, s_k, h_kv, group, d).sum(3), dv.reshape(b, s_k, h_kv, group, d).sum(3)
