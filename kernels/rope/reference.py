"""Rotary position embedding (RoFormer, arXiv:2104.09864) in plain PyTorch: the spec the Triton kernel matches.

Half-split convention (Llama / GPT-NeoX): channel i of a head pairs with channel i + d/2, and
the pair is rotated by angle_i = position * inv_freq_i, inv_freq_i = theta^(-2i/d):

    y[i]       = x[i] cos(angle_i) - x[i + d/2] sin(angle_i)
    y[i + d/2] = x[i + d/2] cos(angle_i) + x[i] sin(angle_i)

in fp32, returned in the input's dtype. Positions come per token from the caller, so a
sequence-parallel rank passes the global positions of its slice and packed documents restart at 0.
"""

from __future__ import annotations

import torch


def rope_inv_freq(head_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    """inv_freq [head_dim // 2] fp32; the kernel takes this very tensor, so its fp32 angles match ours."""
    return 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def rope_reference(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                   theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q [b, s, h, d], k [b, s, h_kv, d], positions [b, s] int -> (q, k) rotated, in their dtypes.

    Differentiable in q and k through plain autograd ops.
    """
    angles = positions.float()[..., None] * rope_inv_freq(q.shape[-1], theta, q.device)  # [b, s, d/2]
    cos, sin = angles.cos()[:, :, None, :], angles.sin()[:, :, None, :]  # [b, s, 1, d/2]: every head
    return _rotate(q, cos, sin), _rotate(k, cos, sin)
