"""Rotary position embedding (RoFormer, arXiv:2104.09864) in plain PyTorch: the spec the Triton kernel matches.

Half-split convention (Llama / GPT-NeoX, Hugging Face's `rotate_half`): channel i of a head pairs
with channel i + d/2, and the pair is rotated by angle_i = position * inv_freq_i and scaled by `scale`:

    y[i]       = scale * (x[i] cos(angle_i) - x[i + d/2] sin(angle_i))
    y[i + d/2] = scale * (x[i + d/2] cos(angle_i) + x[i] sin(angle_i))

in fp32, returned in the input's dtype. inv_freq comes from the caller (plain RoPE: `rope_inv_freq`;
context-extension schemes: ithaca.models.rope_scaling), and so does scale (1 except YaRN, whose
attention factor multiplies cos and sin). Positions come per token from the caller, so a
sequence-parallel rank passes the global positions of its slice and packed documents restart at 0.
"""

from __future__ import annotations

import torch


def rope_inv_freq(head_dim: int, theta: float, device: torch.device | None = None) -> torch.Tensor:
    """Plain RoPE's inv_freq_i = theta^(-2i/d), [head_dim // 2] fp32."""
    return 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def rope_reference(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
                   scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """q [b, s, h, d], k [b, s, h_kv, d], positions [b, s] int, inv_freq [d/2] fp32 -> (q, k) rotated
    and scaled, in their dtypes. Differentiable in q and k through plain autograd ops.
    """
    angles = positions.float()[..., None] * inv_freq  # [b, s, d/2]
    cos, sin = angles.cos()[:, :, None, :] * scale, angles.sin()[:, :, None, :] * scale  # [b, s, 1, d/2]: every head
    return _rotate(q, cos, sin), _rotate(k, cos, sin)
