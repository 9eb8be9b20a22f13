"""Rotary position embedding (RoFormer, arXiv:2104.09864), half-split convention as in Llama.

Positions come from the caller, so a sequence-parallel rank passes the global positions of its
slice and packed documents can restart at 0.
"""

from __future__ import annotations

import torch


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [b, s] (int) -> (cos, sin), each [b, s, 1, head_dim // 2] in fp32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    angles = positions.float()[..., None] * inv_freq  # [b, s, d/2]
    return angles.cos()[:, :, None, :], angles.sin()[:, :, None, :]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [b, s, h, d] by the angles; pairs are (x[..., i], x[..., i + d/2])."""
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return rotated.to(x.dtype)
