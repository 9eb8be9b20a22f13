"""SwiGLU's gating (arXiv:2002.05202) in plain PyTorch: silu(gate) * up, silu(g) = g * sigmoid(g),
in fp32 and returned in gate's dtype. The spec the Triton kernel matches."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up [..., F] -> [..., F] in gate's dtype. Differentiable through plain autograd ops."""
    return (F.silu(gate.float()) * up.float()).to(gate.dtype)
