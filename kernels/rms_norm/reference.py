"""RMSNorm (arXiv:1910.07467) in plain PyTorch, fp32 math: the spec the Triton kernel matches.

    y = x * rsqrt(mean(x^2 over the last dim) + eps) * weight

computed in fp32 and returned in x's dtype. `weight` is [dim] (one gain per channel) or
[heads, dim] matching x's last two dims (a gain per head and channel, as the linear-attention
output norm has; the norm is still over the last dim alone). With a residual the norm is of
s = x + residual, added in x's dtype as eager `x + residual` adds, and s is returned too: the
fused add of a pre-norm block, where s is the residual stream the next block reads.
"""

from __future__ import annotations

import torch


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float,
                       residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """x [..., dim], weight [dim] or [heads, dim] -> y like x; with `residual` (like x) -> (y, s = x + residual).

    Differentiable through plain autograd ops.
    """
    if residual is not None:
        x = x + residual
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    y = y.to(x.dtype)
    return y if residual is None else (y, x)
