"""RMSNorm (arXiv:1910.07467) modules over the fused kernel `ithaca.kernels.rms_norm`."""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes
from torch import nn

from ithaca.kernels import rms_norm
from ithaca.models.llama_args import KernelChoice


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight over the last dim; with `residual`, the pre-norm block's
    fused add: returns (norm(x + residual), x + residual)."""

    def __init__(self, dim: int, eps: float, impl: KernelChoice):
        super().__init__()
        self.eps, self.impl = eps, impl
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (normed, the stream x + residual); without `residual` the stream is x itself."""
        if residual is None:
            return rms_norm(x, self.weight, self.eps, impl=self.impl), x
        return rms_norm(x, self.weight, self.eps, residual=residual, impl=self.impl)


class HeadRMSNorm(nn.Module):
    """RMSNorm of each head's output with its own gains (RetNet's group norm; one group per head).

    The gains are [local heads, head_dim], split over tp with the heads: a gain shared by all heads
    would get a different partial gradient on each tp rank (each sees only its heads).
    """

    def __init__(self, local_heads: int, head_dim: int, eps: float, impl: KernelChoice):
        super().__init__()
        self.eps, self.impl = eps, impl
        self.weight = nn.Parameter(torch.ones(local_heads, head_dim))
        # megatron-core's marker: DeepSpeed's clipping then counts it once per tp rank, not once overall
        set_tensor_model_parallel_attributes(self.weight, is_parallel=True, dim=0, stride=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [b, s, local heads, head_dim]."""
        return rms_norm(x, self.weight, self.eps, impl=self.impl)
