"""RMSNorm, optionally fused with the residual add of a pre-norm block: one dispatch.

Implementations; the math is in reference.py:
  triton     ours (triton.py): forward and backward kernels; a CUDA tensor, or the CPU under TRITON_INTERPRET=1
  reference  plain PyTorch, fp32 math: the spec
"auto" picks Triton on CUDA and the reference elsewhere; each call logs once which runs and why.
"""

from __future__ import annotations

from typing import Literal

import torch

from ithaca.kernels._backend import auto_triton_or, choose
from ithaca.kernels.rms_norm.reference import rms_norm_reference

__all__ = ["rms_norm", "rms_norm_reference"]


def _check(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None) -> None:
    if x.dim() == 0:
        raise ValueError("rms_norm: x must be [..., dim]; got a scalar")
    if weight.dim() not in (1, 2) or weight.dim() > x.dim() or weight.shape != x.shape[-weight.dim():]:
        raise ValueError(f"rms_norm: weight must be [dim] or [heads, dim] matching x's last dims "
                         f"{tuple(x.shape[-2:])}; got weight {tuple(weight.shape)}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"rms_norm: residual must have x's shape {tuple(x.shape)} and dtype {x.dtype}; "
                         f"got {tuple(residual.shape)} {residual.dtype}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None, *,
             impl: Literal["auto", "triton", "reference"] = "auto") -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """x * rsqrt(mean(x^2 over the last dim) + eps) * weight in fp32, returned in x's dtype; differentiable.

    x [..., dim]; weight [dim], or [heads, dim] for per-head gains (x [..., heads, dim]).
    Without `residual` returns y like x. With `residual` (x's shape and dtype) returns
    (norm(s), s) for s = x + residual rounded to x's dtype, as eager `x + residual` is; the
    gradient of s flows into both x and residual. Raises ValueError naming weight or residual
    when its shape does not fit, and for an unknown impl or 'triton' where Triton cannot run.
    """
    _check(x, weight, residual)
    impl = choose("rms_norm", impl, ("triton", "reference"), x, lambda: auto_triton_or("reference", x))
    if impl == "triton":
        from ithaca.kernels.rms_norm.triton import rms_norm_triton  # triton is imported only when chosen

        return rms_norm_triton(x, weight, eps, residual)
    return rms_norm_reference(x, weight, eps, residual)
