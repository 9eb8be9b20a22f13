"""What our Triton kernels share: the dot product and the launch settings that hold on a GPU and
under the interpreter. Imported only where a Triton implementation has been chosen."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ithaca.kernels._backend import interpreting


def exact_dots(dtype: torch.dtype) -> bool:
    """Whether `dot` upcasts its operands to fp32 and multiplies in IEEE fp32.

    True for fp32 inputs (tests hold them to ~1e-5; TF32 would not meet that) and under the
    interpreter, which in triton 3.9 multiplies bf16 operands as their raw uint16 bits.
    """
    return dtype == torch.float32 or interpreting()


@triton.jit
def dot(a, b, EXACT: tl.constexpr):
    """a @ b with an fp32 accumulator; EXACT (see exact_dots) upcasts both operands first."""
    if EXACT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


def block_size(n: int, *, lo: int = 16, hi: int = 128) -> int:
    """A power-of-two block covering `n` elements, clamped to [lo, hi] (tl.dot needs >= 16)."""
    return max(lo, min(hi, triton.next_power_of_2(n)))
