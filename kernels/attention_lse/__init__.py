"""Attention with log-sum-exp (the ring step): one dispatch between flash-attn, PyTorch's CPU kernel
and the reference. The math is in reference.py."""

from __future__ import annotations

from typing import Literal

import torch

from ithaca.kernels._backend import flash_attn_usable
from ithaca.kernels.attention_lse.reference import attention_lse_bwd_reference, attention_lse_fwd_reference
from ithaca.log import get_logger, warn_once

log = get_logger(__name__)

Impl = Literal["auto", "flash", "cpu", "reference"]

__all__ = ["attention_lse_fwd", "attention_lse_bwd", "attention_lse_fwd_reference", "attention_lse_bwd_reference"]


def _choose(q: torch.Tensor, impl: Impl, allowed: torch.Tensor | None) -> str:
    if allowed is not None and impl in ("auto", "reference"):
        if impl == "auto":
            warn_once(log, "attention_lse: blocks with a document mask use the reference kernel "
                           "(O(s_q*s_k) memory per block); no fused masked kernel yet")
        return "reference"
    if allowed is not None:
        raise ValueError(f"attention_lse: impl={impl!r} takes no mask; use 'auto' or 'reference'")
    if impl == "auto":
        if flash_attn_usable(q):
            return "flash"
        return "cpu" if q.device.type == "cpu" else "reference"
    if impl not in ("flash", "cpu", "reference"):
        raise ValueError(f"attention_lse: impl={impl!r}; choose 'auto', 'flash', 'cpu' or 'reference'")
    return impl


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool, allowed: torch.Tensor | None) -> None:
    if q.dim() != 4 or k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
        raise ValueError(f"attention_lse: want q [b, s, h, d], k = v [b, s_k, h_kv, d]; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"attention_lse: q heads {q.shape[2]} must be a multiple of kv heads {k.shape[2]}")
    if is_causal and q.shape[1] != k.shape[1]:
        raise ValueError(f"attention_lse: causal needs as many queries as keys; got {q.shape[1]} and {k.shape[1]}")
    if allowed is not None and allowed.shape != (q.shape[0], q.shape[1], k.shape[1]):
        raise ValueError(f"attention_lse: allowed must be [b, s_q, s_k] = {(q.shape[0], q.shape[1], k.shape[1])}; "
                         f"got {tuple(allowed.shape)}")


def attention_lse_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, is_causal: bool, scale: float,
                      allowed: torch.Tensor | None = None, impl: Impl = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """q [b, s, h, d], k/v [b, s_k, h_kv, d] -> (out [b, s, h, d], lse [b, h, s] fp32).

    `allowed` [b, s_q, s_k] bool (packed documents) limits the keys each query reads.
    """
    _check(q, k, v, is_causal, allowed)
    impl = _choose(q, impl, allowed)
    if impl == "flash":
        from ithaca.kernels.attention_lse.flash_cuda import attention_lse_fwd_flash  # optional GPU extra

        return attention_lse_fwd_flash(q, k, v, is_causal=is_causal, scale=scale)
    if impl == "cpu":
        from ithaca.kernels.attention_lse.cpu_flash import attention_lse_fwd_cpu

        return attention_lse_fwd_cpu(q, k, v, is_causal=is_causal, scale=scale)
    return attention_lse_fwd_reference(q, k, v, is_causal=is_causal, scale=scale, allowed=allowed)


def attention_lse_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                      lse: torch.Tensor, *, is_causal: bool, scale: float, allowed: torch.Tensor | None = None,
                      impl: Impl = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One block's (dq, dk, dv) in fp32 given the final (merged) out and lse."""
    _check(q, k, v, is_causal, allowed)
    impl = _choose(q, impl, allowed)
    if impl == "flash":
        from ithaca.kernels.attention_lse.flash_cuda import attention_lse_bwd_flash

        return attention_lse_bwd_flash(dout, q, k, v, out, lse, is_causal=is_causal, scale=scale)
    if impl == "cpu":
        from ithaca.kernels.attention_lse.cpu_flash import attention_lse_bwd_cpu

        return attention_lse_bwd_cpu(dout, q, k, v, out, lse, is_causal=is_causal, scale=scale)
    return attention_lse_bwd_reference(dout, q, k, v, out, lse, is_causal=is_causal, scale=scale, allowed=allowed)
