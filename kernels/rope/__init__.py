"""Rotary position embedding of q and k: one dispatch.

Implementations; the math is in reference.py:
  triton     ours (triton.py): q and k in one launch, strided views read in place, backward kernel;
             a CUDA tensor, or the CPU under TRITON_INTERPRET=1
  reference  plain PyTorch, fp32 math: the spec
"auto" picks Triton on CUDA and the reference elsewhere; each call logs once which runs and why.
"""

from __future__ import annotations

from typing import Literal

import torch

from ithaca.kernels._backend import auto_triton_or, choose
from ithaca.kernels.rope.reference import rope_inv_freq, rope_reference

__all__ = ["rope", "rope_inv_freq", "rope_reference"]


def _check(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"rope: q and k must be [b, s, heads, head_dim]; got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        raise ValueError(f"rope: k {tuple(k.shape)} must share q's b, s and head_dim {tuple(q.shape)}")
    if q.shape[3] % 2:
        raise ValueError(f"rope: head_dim={q.shape[3]} must be even (channel i pairs with i + head_dim/2)")
    if positions.shape != q.shape[:2] or positions.is_floating_point():
        raise ValueError(f"rope: positions must be integer [b, s] = {tuple(q.shape[:2])}; "
                         f"got {positions.dtype} {tuple(positions.shape)}")
    if inv_freq.shape != (q.shape[3] // 2,) or inv_freq.dtype != torch.float32 or inv_freq.device != q.device:
        raise ValueError(f"rope: inv_freq must be fp32 [head_dim/2] = [{q.shape[3] // 2}] on {q.device}; got "
                         f"{inv_freq.dtype} {tuple(inv_freq.shape)} on {inv_freq.device}")


def rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, *, scale: float = 1.0,
         impl: Literal["auto", "triton", "reference"] = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k by their tokens' positions (half-split pairs), fp32 math; differentiable in q and k.

    q [b, s, h, d], k [b, s, h_kv, d] (any h_kv), d even; views with unit stride in d are read in
    place. positions [b, s] integer, per token (packed documents restart them); no gradient.
    inv_freq [d/2] fp32 on q's device: the frequencies, theta^(-2i/d) for plain RoPE
    (`rope_inv_freq`), or a context-extension scheme's (ithaca.models.rope_scaling). scale multiplies
    cos and sin (YaRN's attention factor; 1 is a pure rotation). Returns (q_rot, k_rot) in q's and
    k's dtypes. Raises ValueError naming q, k, head_dim, positions or inv_freq when they do not fit,
    and for an unknown impl or 'triton' where Triton cannot run.
    """
    _check(q, k, positions, inv_freq)
    impl = choose("rope", impl, ("triton", "reference"), q, lambda: auto_triton_or("reference", q))
    if impl == "triton":
        from ithaca.kernels.rope.triton import rope_triton  # triton is imported only when chosen

        return rope_triton(q, k, positions, inv_freq, scale)
    return rope_reference(q, k, positions, inv_freq, scale)
