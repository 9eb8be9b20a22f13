"""SwiGLU's gating, silu(gate) * up: one dispatch.

Implementations; the math is in reference.py:
  triton     ours (triton.py): forward and backward kernels, strided rows read in place; a CUDA
             tensor, or the CPU under TRITON_INTERPRET=1
  reference  plain PyTorch, fp32 math: the spec
"auto" picks Triton on CUDA and the reference elsewhere; each call logs once which runs and why.
"""

from __future__ import annotations

from typing import Literal

import torch

from ithaca.kernels._backend import auto_triton_or, choose
from ithaca.kernels.swiglu.reference import swiglu_reference

__all__ = ["swiglu", "swiglu_reference"]


def swiglu(gate: torch.Tensor, up: torch.Tensor, *,
           impl: Literal["auto", "triton", "reference"] = "auto") -> torch.Tensor:
    """silu(gate) * up in fp32, returned in gate's dtype; differentiable in both.

    gate and up [..., F], the same shape; views with unit stride in F (the halves of
    `x.chunk(2, dim=-1)`) are read in place. Raises ValueError naming up when the shapes differ,
    and for an unknown impl or 'triton' where Triton cannot run.
    """
    if gate.dim() == 0 or up.shape != gate.shape:
        raise ValueError(f"swiglu: up must have gate's shape [..., F]; got gate {tuple(gate.shape)}, "
                         f"up {tuple(up.shape)}")
    impl = choose("swiglu", impl, ("triton", "reference"), gate, lambda: auto_triton_or("reference", gate))
    if impl == "triton":
        from ithaca.kernels.swiglu.triton import swiglu_triton  # triton is imported only when chosen

        return swiglu_triton(gate, up)
    return swiglu_reference(gate, up)
