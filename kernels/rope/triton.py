"""Rotary position embedding in Triton: q and k rotated in one launch, forward and backward.

The math is reference.py's. Each program takes BLOCK_T tokens (of b * s), computes their fp32
angles position * inv_freq once (the caller's inv_freq tensor, the reference's too, so the angles
are the reference's to the bit), scales cos and sin by SCALE, and rotates every head of q and then
of k with them. q and k are read
through their strides, so views into a fused qkv projection are not copied; outputs are new
contiguous tensors. A scaled rotation's transpose is the same scale times the rotation by
-angle, so the backward is the same kernel with sin negated. tl.cos / tl.sin lower to libdevice's __nv_cosf / __nv_sinf on
NVIDIA (full range reduction), not to the .approx instructions.

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
def _rotate_heads(x, y, s_xb, s_xs, s_xh, o_t, m_t, S, H, HALF, b_cos, b_sin, BLOCK_HALF: tl.constexpr):
    """Rotate the H heads of tokens o_t of x [b, s, H, 2 * HALF] into y, contiguous [b * s, H, 2 * HALF]."""
    o_d = tl.arange(0, BLOCK_HALF)
    m_td = m_t[:, None] & (o_d < HALF)[None, :]
    p_x = x + (o_t // S)[:, None] * s_xb + (o_t % S)[:, None] * s_xs + o_d[None, :]
    p_y = y + o_t[:, None] * (H * 2 * HALF) + o_d[None, :]
    for i_h in range(H):
        b_x1 = tl.load(p_x + i_h * s_xh, mask=m_td, other=0.0).to(tl.float32)
        b_x2 = tl.load(p_x + i_h * s_xh + HALF, mask=m_td, other=0.0).to(tl.float32)
        tl.store(p_y + i_h * 2 * HALF, (b_x1 * b_cos - b_x2 * b_sin).to(y.dtype.element_ty), mask=m_td)
        tl.store(p_y + i_h * 2 * HALF + HALF, (b_x2 * b_cos + b_x1 * b_sin).to(y.dtype.element_ty), mask=m_td)


@triton.jit
def _rope(q, k, q_out, k_out, pos, inv_freq, s_qb, s_qs, s_qh, s_kb, s_ks, s_kh, s_pb, s_ps, T, S, H, H_KV, HALF,
          SCALE, BACKWARD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_HALF: tl.constexpr):
    i_t = tl.program_id(0)
    o_t = i_t * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)  # token b * S + s; int64: offsets can pass 2^31
    o_d = tl.arange(0, BLOCK_HALF)
    m_t = o_t < T
    b_pos = tl.load(pos + (o_t // S) * s_pb + (o_t % S) * s_ps, mask=m_t, other=0).to(tl.float32)
    b_freq = tl.load(inv_freq + o_d, mask=o_d < HALF, other=0.0)
    b_angle = b_pos[:, None] * b_freq[None, :]  # [BLOCK_T, BLOCK_HALF], as reference.py's fp32 product
    b_cos, b_sin = tl.cos(b_angle) * SCALE, tl.sin(b_angle) * SCALE
    if BACKWARD:
        b_sin = -b_sin  # R(angle)^T = R(-angle)
    _rotate_heads(q, q_out, s_qb, s_qs, s_qh, o_t, m_t, S, H, HALF, b_cos, b_sin, BLOCK_HALF)
    _rotate_heads(k, k_out, s_kb, s_ks, s_kh, o_t, m_t, S, H_KV, HALF, b_cos, b_sin, BLOCK_HALF)


def _launch(half: int) -> dict:
    """Tokens per program: few under the interpreter, so tiny tests cover several programs."""
    block_half = triton.next_power_of_2(half)
    if interpreting():
        return dict(BLOCK_T=4, BLOCK_HALF=block_half)
    return dict(BLOCK_T=max(1, min(32, 2048 // block_half)), BLOCK_HALF=block_half, num_warps=4)


def _rotate(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, scale: float,
            backward: bool) -> tuple[torch.Tensor, torch.Tensor]:
    q, k = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k))  # rows are read with unit stride
    b, s, h, d = q.shape
    q_out, k_out = new_output(q.shape, q), new_output(k.shape, k)
    launch = _launch(d // 2)
    _rope[(triton.cdiv(b * s, launch["BLOCK_T"]),)](
        q, k, q_out, k_out, positions, inv_freq, *q.stride()[:3], *k.stride()[:3],
        *positions.stride(), b * s, s, h, k.shape[2], d // 2, float(scale), BACKWARD=backward, **launch)
    return q_out, k_out


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, scale: float):
        ctx.save_for_backward(positions, inv_freq)
        ctx.scale = scale
        return _rotate(q, k, positions, inv_freq, scale, backward=False)

    @staticmethod
    def backward(ctx, dq_rot: torch.Tensor, dk_rot: torch.Tensor):
        positions, inv_freq = ctx.saved_tensors
        dq, dk = _rotate(dq_rot, dk_rot, positions, inv_freq, ctx.scale, backward=True)
        return dq, dk, None, None, None  # positions, inv_freq and scale take no gradient


def rope_triton(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
                scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """reference.py's contract, differentiable in q and k; shapes checked by the dispatch."""
    return _Rope.apply(q, k, positions, inv_freq, scale)
