"""RMSNorm in Triton, forward and backward, optionally fused with the residual add before it.

The math is reference.py's. x is read as rows [n, heads, dim] (heads = 1 for a [dim] weight):
program (i, j) of the forward normalises one block of BLOCK_N rows of head j, so it reads one
row of gains, and saves rstd = rsqrt(mean(x^2) + eps) [n, heads] fp32 for the backward:

    x_hat = x * rstd    g = dy * weight    dx = rstd * (g - x_hat * mean(g * x_hat))    dw = sum_n dy * x_hat

With a residual, x above is s = x + residual, and the gradient of the returned s adds into dx,
which is also the residual's gradient. For dw each backward program strides through the row
blocks of its head, sums its rows in fp32 and writes one partial row; torch adds the few
partials, so there are no atomics and the result does not depend on scheduling.

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
def _to_bf16_rtne(b_x):
    """fp32 -> bf16 rounded to nearest even, as `.to(tl.bfloat16)` rounds on a GPU; triton 3.9's
    interpreter truncates there instead, and s must equal eager `x + residual` bit for bit under both."""
    b_u = b_x.to(tl.uint32, bitcast=True)
    b_rounded = (b_u + 0x7FFF + ((b_u >> 16) & 1)) >> 16  # add half an ulp of bf16, ties to the even neighbour
    b_nan = (b_u >> 16) | 0x40  # a quiet NaN: rounding could carry a NaN's payload into the sign bit
    return tl.where(b_x == b_x, b_rounded, b_nan).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _rms_norm_fwd(x, res, w, y, s, rstd, s_xn, s_xh, s_rn, s_rh, N, H, D, eps,
                  HAS_RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    i_n, i_h = tl.program_id(0), tl.program_id(1)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)  # int64: n * heads * dim can pass 2^31
    o_d = tl.arange(0, BLOCK_D)
    m_n, m_d = o_n < N, o_d < D
    m_nd = m_n[:, None] & m_d[None, :]
    b_x = tl.load(x + o_n[:, None] * s_xn + i_h * s_xh + o_d[None, :], mask=m_nd, other=0.0)
    o_out = (o_n[:, None] * H + i_h) * D + o_d[None, :]  # y and s are new, contiguous [n, heads, dim]
    if HAS_RESIDUAL:
        b_r = tl.load(res + o_n[:, None] * s_rn + i_h * s_rh + o_d[None, :], mask=m_nd, other=0.0)
        # rounded to x's dtype as eager `x + residual` is: s is handed back and is what gets normalised
        b_s = b_x.to(tl.float32) + b_r.to(tl.float32)
        if s.dtype.element_ty == tl.bfloat16:
            b_x = _to_bf16_rtne(b_s)
        else:
            b_x = b_s.to(s.dtype.element_ty)
        tl.store(s + o_out, b_x, mask=m_nd)
    b_x = b_x.to(tl.float32)
    b_rstd = tl.rsqrt(tl.sum(b_x * b_x, 1) / D + eps)  # [BLOCK_N]; padded columns load 0
    b_w = tl.load(w + i_h * D + o_d, mask=m_d, other=0.0).to(tl.float32)
    b_y = b_x * b_rstd[:, None] * b_w[None, :]
    tl.store(y + o_out, b_y.to(y.dtype.element_ty), mask=m_nd)
    tl.store(rstd + o_n * H + i_h, b_rstd, mask=m_n)


@triton.jit
def _rms_norm_bwd(dy, ds, x, w, rstd, dx, dw_part, s_dyn, s_dyh, s_dsn, s_dsh, s_xn, s_xh, N, H, D,
                  HAS_DS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """dx for the row blocks i_p, i_p + P, ... of head i_h, and their dw summed into dw_part[i_p, i_h]."""
    i_p, i_h = tl.program_id(0), tl.program_id(1)
    n_programs = tl.num_programs(0)
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    b_w = tl.load(w + i_h * D + o_d, mask=m_d, other=0.0).to(tl.float32)
    b_dw = tl.zeros([BLOCK_D], tl.float32)
    for start in range(i_p * BLOCK_N, N, n_programs * BLOCK_N):
        o_n = start + tl.arange(0, BLOCK_N).to(tl.int64)
        m_n = o_n < N
        m_nd = m_n[:, None] & m_d[None, :]
        # masked rows and columns load 0, so they add nothing to the sums below
        b_x = tl.load(x + o_n[:, None] * s_xn + i_h * s_xh + o_d[None, :], mask=m_nd, other=0.0).to(tl.float32)
        b_dy = tl.load(dy + o_n[:, None] * s_dyn + i_h * s_dyh + o_d[None, :], mask=m_nd, other=0.0).to(tl.float32)
        b_rstd = tl.load(rstd + o_n * H + i_h, mask=m_n, other=0.0)
        b_xhat = b_x * b_rstd[:, None]
        b_g = b_dy * b_w[None, :]
        b_dx = b_rstd[:, None] * (b_g - b_xhat * (tl.sum(b_g * b_xhat, 1) / D)[:, None])
        if HAS_DS:
            b_dx += tl.load(ds + o_n[:, None] * s_dsn + i_h * s_dsh + o_d[None, :], mask=m_nd, other=0.0).to(tl.float32)
        tl.store(dx + (o_n[:, None] * H + i_h) * D + o_d[None, :], b_dx.to(dx.dtype.element_ty), mask=m_nd)
        b_dw += tl.sum(b_dy * b_xhat, 0)
    tl.store(dw_part + (i_p * H + i_h) * D + o_d, b_dw, mask=m_d)


def _rows(t: torch.Tensor, heads: int) -> torch.Tensor:
    """t [..., dim] as [n, heads, dim] with unit stride in dim (a view where the layout allows)."""
    t = t if t.stride(-1) == 1 else t.contiguous()
    return t.reshape(-1, heads, t.shape[-1])


def _launch(d: int) -> dict:
    """Rows per program and warps: small blocks under the interpreter, so tiny tests cover several."""
    block_d = triton.next_power_of_2(d)
    if interpreting():
        return dict(BLOCK_N=4, BLOCK_D=block_d)
    block_n = max(1, min(16, 8192 // block_d))  # about 8K fp32 values a tile: a whole row stays in registers
    return dict(BLOCK_N=block_n, BLOCK_D=block_d, num_warps=min(16, max(4, block_n * block_d // 1024)))


def _backward_programs(n_blocks: int, x: torch.Tensor) -> int:
    """Programs per head in the backward: enough to fill the GPU, few enough that the dw partials stay small."""
    if interpreting():
        return min(n_blocks, 2)  # each program then loops over several row blocks in the tests
    return min(n_blocks, 4 * torch.cuda.get_device_properties(x.device).multi_processor_count)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None, eps: float):
        heads, d = (weight.shape[0] if weight.dim() == 2 else 1), x.shape[-1]
        x3 = _rows(x, heads)
        res3 = _rows(residual, heads) if residual is not None else x3  # unused when HAS_RESIDUAL is False
        n = x3.shape[0]
        y = new_output(x.shape, x)
        s = new_output(x.shape, x) if residual is not None else y  # unused when HAS_RESIDUAL is False
        rstd = new_output((n, heads), x, torch.float32)
        launch = _launch(d)
        grid = (triton.cdiv(n, launch["BLOCK_N"]), heads)
        _rms_norm_fwd[grid](x3, res3, weight.contiguous(), y, s, rstd, x3.stride(0), x3.stride(1),
                            res3.stride(0), res3.stride(1), n, heads, d, eps,
                            HAS_RESIDUAL=residual is not None, **launch)
        ctx.has_residual = residual is not None
        ctx.save_for_backward(s if residual is not None else x, weight, rstd)
        return (y, s) if residual is not None else y

    @staticmethod
    def backward(ctx, dy: torch.Tensor, ds: torch.Tensor | None = None):
        normed_input, weight, rstd = ctx.saved_tensors
        n, heads = rstd.shape
        d = normed_input.shape[-1]
        x3, dy3 = _rows(normed_input, heads), _rows(dy, heads)
        ds3 = _rows(ds, heads) if ctx.has_residual else dy3  # unused when HAS_DS is False
        launch = _launch(d)
        programs = _backward_programs(triton.cdiv(n, launch["BLOCK_N"]), dy)
        dx = new_output(normed_input.shape, normed_input)
        dw_part = new_output((programs, heads, d), dy, torch.float32)  # every program writes its row
        _rms_norm_bwd[(programs, heads)](dy3, ds3, x3, weight.contiguous(), rstd, dx, dw_part,
                                         dy3.stride(0), dy3.stride(1), ds3.stride(0), ds3.stride(1),
                                         x3.stride(0), x3.stride(1), n, heads, d, HAS_DS=ctx.has_residual,
                                         **launch)
        dw = dw_part.sum(0).reshape(weight.shape).to(weight.dtype)
        # s = x + residual: both get the gradient reaching s (autograd copies it where it must)
        return dx, dw, (dx if ctx.has_residual else None), None


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float,
                    residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """reference.py's contract, differentiable in x, weight and residual; shapes checked by the dispatch."""
    return _RMSNorm.apply(x, weight, residual, eps)
