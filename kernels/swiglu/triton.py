"""SwiGLU's gating in Triton, forward and backward: y = silu(g) * u, and with sigma = sigmoid(g)

    dg = dy * u * sigma * (1 + g * (1 - sigma))      du = dy * silu(g)

The math is reference.py's. gate and up are read as rows [n, F] through their row strides, so the
two halves of one [.., 2F] projection (`x.chunk(2, dim=-1)`) are not copied; each program takes a
[BLOCK_N, BLOCK_F] tile. The backward recomputes sigmoid from the saved inputs instead of
saving it. Outputs are new contiguous tensors.

Names follow fla: p_ pointers, b_ blocks, o_ offsets, m_ masks, CAPS constexprs.
Never run on a GPU yet: tested under TRITON_INTERPRET=1 only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ithaca.kernels._alloc import new_output
from ithaca.kernels._backend import interpreting


@triton.jit
def _tile(i_n, i_f, N, F, BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr):
    """Row offsets (int64: n * F can pass 2^31), column offsets and the mask of one tile."""
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    o_f = i_f * BLOCK_F + tl.arange(0, BLOCK_F)
    return o_n, o_f, (o_n < N)[:, None] & (o_f < F)[None, :]


@triton.jit
def _swiglu_fwd(gate, up, y, s_g, s_u, N, F, BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr):
    o_n, o_f, m_nf = _tile(tl.program_id(0), tl.program_id(1), N, F, BLOCK_N, BLOCK_F)
    b_g = tl.load(gate + o_n[:, None] * s_g + o_f[None, :], mask=m_nf, other=0.0).to(tl.float32)
    b_u = tl.load(up + o_n[:, None] * s_u + o_f[None, :], mask=m_nf, other=0.0).to(tl.float32)
    b_y = b_g * tl.sigmoid(b_g) * b_u
    tl.store(y + o_n[:, None] * F + o_f[None, :], b_y.to(y.dtype.element_ty), mask=m_nf)


@triton.jit
def _swiglu_bwd(dy, gate, up, dgate, dup, s_dy, s_g, s_u, N, F, BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr):
    o_n, o_f, m_nf = _tile(tl.program_id(0), tl.program_id(1), N, F, BLOCK_N, BLOCK_F)
    b_dy = tl.load(dy + o_n[:, None] * s_dy + o_f[None, :], mask=m_nf, other=0.0).to(tl.float32)
    b_g = tl.load(gate + o_n[:, None] * s_g + o_f[None, :], mask=m_nf, other=0.0).to(tl.float32)
    b_u = tl.load(up + o_n[:, None] * s_u + o_f[None, :], mask=m_nf, other=0.0).to(tl.float32)
    b_sig = tl.sigmoid(b_g)
    b_dg = b_dy * b_u * b_sig * (1.0 + b_g * (1.0 - b_sig))  # d silu(g)/dg
    o_out = o_n[:, None] * F + o_f[None, :]
    tl.store(dgate + o_out, b_dg.to(dgate.dtype.element_ty), mask=m_nf)
    tl.store(dup + o_out, (b_dy * b_g * b_sig).to(dup.dtype.element_ty), mask=m_nf)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t [..., F] as [n, F] with unit stride in F (a view where the layout allows: chunk halves are)."""
    t = t if t.stride(-1) == 1 else t.contiguous()
    return t.reshape(-1, t.shape[-1])


def _launch(n: int, f: int) -> tuple[tuple[int, int], dict]:
    """Grid and tile: small tiles under the interpreter, so tiny tests cover several in both dims."""
    if interpreting():
        block_n, block_f, extra = 4, 16, {}
    else:
        block_f = min(1024, triton.next_power_of_2(f))
        block_n, extra = max(1, min(64, 4096 // block_f)), dict(num_warps=4)  # about 4K elements a tile
    return (triton.cdiv(n, block_n), triton.cdiv(f, block_f)), dict(BLOCK_N=block_n, BLOCK_F=block_f, **extra)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        g2, u2 = _rows(gate), _rows(up)
        n, f = g2.shape
        y = new_output(gate.shape, gate)
        grid, launch = _launch(n, f)
        _swiglu_fwd[grid](g2, u2, y, g2.stride(0), u2.stride(0), n, f, **launch)
        ctx.save_for_backward(gate, up)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate, up = ctx.saved_tensors
        dy2, g2, u2 = _rows(dy), _rows(gate), _rows(up)
        n, f = g2.shape
        dgate, dup = new_output(gate.shape, gate), new_output(up.shape, up)
        grid, launch = _launch(n, f)
        _swiglu_bwd[grid](dy2, g2, u2, dgate, dup, dy2.stride(0), g2.stride(0), u2.stride(0), n, f, **launch)
        return dgate, dup


def swiglu_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """reference.py's contract, differentiable in gate and up; shapes checked by the dispatch."""
    return _SwiGLU.apply(gate, up)
