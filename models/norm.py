"""RMSNorm (arXiv:1910.07467): x / sqrt(mean(x^2) + eps) * weight, computed in fp32."""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(x.dtype)


class HeadRMSNorm(nn.Module):
    """RMSNorm of each head's output with its own gains (RetNet's group norm; one group per head).

    The gains are [local heads, head_dim], split over tp with the heads: a gain shared by all heads
    would get a different partial gradient on each tp rank (each sees only its heads).
    """

    def __init__(self, local_heads: int, head_dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(local_heads, head_dim))
        # megatron-core's marker: DeepSpeed's clipping then counts it once per tp rank, not once overall
        set_tensor_model_parallel_attributes(self.weight, is_parallel=True, dim=0, stride=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [b, s, local heads, head_dim]."""
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(x.dtype)
