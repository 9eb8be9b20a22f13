"""Linear attention with decay and document resets in Triton, forward and backward.

The chunk structure is fla's chunk_simple_gla (fla-org/flash-linear-attention, fla/ops/simple_gla,
fla/ops/common/chunk_h.py); the code is ours. The math is chunked.py's. Per (batch row, head)
the sequence is cut into chunks of BT tokens (64 on a GPU; 16 under the interpreter, so tests
cross chunks); the last chunk may be shorter and is masked. Torch prepares g (the inclusive
cumsum of log_decay inside each chunk) and seg (each token's document segment); for chunk c
with last token L, triton_common.chunk_weights turns them into these weights (the reset masks
reach, same, leave and keep are defined there; all in [0, 1], as log decays are <= 0):

    r_i = reach_i exp(g_i),   w_j = leave_j exp(g_L - g_j),   keep_c exp(g_L),   A_ij = same_ij exp(g_i - g_j)

Forward, H [d_k, d_v] fp32 per (b, h):
  (a) _state_fwd, grid (d_k blocks, d_v blocks, b*h), serial over chunks:
        H_0 = initial_state (or 0),   H_{c+1} = keep_c exp(g_L) H_c + sum_j w_j k_j^T v_j
      stores each chunk's incoming H_c into [b, h, NT, d_k, d_v] and H_NT (the final state).
  (b) _output_fwd, grid (chunks, d_v blocks, b*h):
        o_i = scale r_i q_i H_c + scale sum_j A_ij (q_i . k_j) v_j

Backward, from dO [b, s, h, d_v] and dH_NT (the final state's gradient; zeros if it has none):
  (c) _state_bwd, grid (d_k blocks, d_v blocks, b*h), chunks in reverse:
        dH_c = keep_c exp(g_L) dH_{c+1} + scale sum_i r_i q_i^T dO_i,     d initial_state = dH_0
      stores, for each chunk c, dH_{c+1}: the gradient of the state leaving it.
  (d) _dqdk_bwd, grid (chunks, d_k blocks, b*h), and _dv_bwd, grid (chunks, d_v blocks, b*h);
      with dS_ij = scale A_ij (dO_i . v_j):
        dq_i = scale r_i dO_i H_c^T + sum_j dS_ij k_j                              [d_k]
        dk_j = w_j v_j dH_{c+1}^T   + sum_i dS_ij q_i                              [d_k]
        dv_j = w_j k_j dH_{c+1}     + scale sum_i A_ij (q_i . k_j) dO_i            [d_v]
  Decay, in torch and only when log_decay requires grad. Take the g_i of one chunk as free
  variables: each term that holds exp(+g_i) is linear in q_i (through r_i, A_i.), or is the
  leaving state's exp(g_L) factor; each that holds exp(-g_j) is linear in k_j (A_.j, w_j). So
        dg_i = q_i . dq_i - k_i . dk_i + [i = L] <dH_{c+1}, H_{c+1}>     (H_{c+1}: the state leaving chunk c)
  and, as g_i = sum over t <= i in the chunk of log_decay_t, d log_decay_t = sum over i >= t in
  the chunk of dg_i (a reverse cumsum inside each chunk); the [h] form sums that over b and s.
  A term a mask removes is zero in the forward and in every gradient, so the masks carry over.

Memory: the per-chunk states (s/BT * d_k * d_v fp32 per head) are not saved for backward but
recomputed there by (a), one more pass over k and v; forward saves q, k, v, g, seg, H_0.
Names follow fla: p_ pointers, b_ blocks, o_ offsets, m_ masks, CAPS constexprs.
Never run on a GPU yet: tested under TRITON_INTERPRET=1 only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ithaca.kernels._alloc import new_output
from ithaca.kernels._backend import interpreting
from ithaca.kernels.linear_attention.reference import expand_log_decay
from ithaca.kernels.triton_common import (block_size, chunk_cumsum, chunk_weights, dot, exact_dots, segment_ids,
                                           state_pointers, token_pointers)


@triton.jit
def _state_fwd(k, v, g, seg, h0, h, ht, S, H, DK, DV, NT,
               BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, EXACT: tl.constexpr):
    """(a) Each chunk's incoming state into h [b, h, NT, DK, DV] and the final one into ht [b, h, DK, DV]."""
    i_k, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    o_k, o_v = i_k * BK + tl.arange(0, BK), i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < DK, o_v < DV
    p_h0, m_h = state_pointers(h0, i_bh, o_k, m_k, o_v, m_v, DK, DV)
    b_h = tl.load(p_h0, mask=m_h, other=0.0)
    for i_t in range(NT):
        p_h, _ = state_pointers(h, i_bh * NT + i_t, o_k, m_k, o_v, m_v, DK, DV)
        tl.store(p_h, b_h, mask=m_h)
        o_t, m_t, b_r, b_w, b_keep, b_a = chunk_weights(g, seg, i_b, i_h, i_t, S, H, BT)
        p_k, m_tk = token_pointers(k, i_b, i_h, o_t, m_t, o_k, m_k, S, H, DK)
        p_v, m_tv = token_pointers(v, i_b, i_h, o_t, m_t, o_v, m_v, S, H, DV)
        b_k = tl.load(p_k, mask=m_tk, other=0.0)  # [BT, BK]
        b_v = tl.load(p_v, mask=m_tv, other=0.0)  # [BT, BV]
        b_h = b_h * b_keep + dot(tl.trans((b_k * b_w[:, None]).to(b_k.dtype)), b_v, EXACT)
    p_ht, _ = state_pointers(ht, i_bh, o_k, m_k, o_v, m_v, DK, DV)
    tl.store(p_ht, b_h, mask=m_h)


@triton.jit
def _output_fwd(q, k, v, g, seg, h, o, scale, S, H, DK, DV, NT,
                BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, EXACT: tl.constexpr):
    """(b) One chunk's outputs for one d_v block: the incoming state's part plus the masked within-chunk part."""
    i_t, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    o_t, m_t, b_r, b_w, b_keep, b_a = chunk_weights(g, seg, i_b, i_h, i_t, S, H, BT)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < DV
    b_o = tl.zeros([BT, BV], dtype=tl.float32)
    b_s = tl.zeros([BT, BT], dtype=tl.float32)  # q_i . k_j
    for i_k in range(tl.cdiv(DK, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < DK
        p_q, m_tk = token_pointers(q, i_b, i_h, o_t, m_t, o_k, m_k, S, H, DK)
        p_k, _ = token_pointers(k, i_b, i_h, o_t, m_t, o_k, m_k, S, H, DK)
        p_h, m_h = state_pointers(h, i_bh * NT + i_t, o_k, m_k, o_v, m_v, DK, DV)
        b_q = tl.load(p_q, mask=m_tk, other=0.0)
        b_k = tl.load(p_k, mask=m_tk, other=0.0)
        b_h = tl.load(p_h, mask=m_h, other=0.0)
        b_o += dot(b_q, b_h.to(b_q.dtype), EXACT)
        b_s += dot(b_q, tl.trans(b_k), EXACT)
    p_v, m_tv = token_pointers(v, i_b, i_h, o_t, m_t, o_v, m_v, S, H, DV)
    b_v = tl.load(p_v, mask=m_tv, other=0.0)
    b_o = b_o * b_r[:, None] + dot((b_s * b_a).to(b_v.dtype), b_v, EXACT)
    p_o, _ = token_pointers(o, i_b, i_h, o_t, m_t, o_v, m_v, S, H, DV)
    tl.store(p_o, (b_o * scale).to(o.dtype.element_ty), mask=m_tv)


@triton.jit
def _state_bwd(q, do, g, seg, dht, dh, dh0, scale, S, H, DK, DV, NT,
               BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, EXACT: tl.constexpr):
    """(c) Chunks in reverse: dh[b, h, c] = the gradient of the state leaving chunk c; dh0 = the initial state's."""
    i_k, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    o_k, o_v = i_k * BK + tl.arange(0, BK), i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < DK, o_v < DV
    p_dht, m_h = state_pointers(dht, i_bh, o_k, m_k, o_v, m_v, DK, DV)
    b_dh = tl.load(p_dht, mask=m_h, other=0.0)
    for i_r in range(NT):
        i_t = NT - 1 - i_r
        p_dh, _ = state_pointers(dh, i_bh * NT + i_t, o_k, m_k, o_v, m_v, DK, DV)
        tl.store(p_dh, b_dh, mask=m_h)
        o_t, m_t, b_r, b_w, b_keep, b_a = chunk_weights(g, seg, i_b, i_h, i_t, S, H, BT)
        p_q, m_tk = token_pointers(q, i_b, i_h, o_t, m_t, o_k, m_k, S, H, DK)
        p_do, m_tv = token_pointers(do, i_b, i_h, o_t, m_t, o_v, m_v, S, H, DV)
        b_q = tl.load(p_q, mask=m_tk, other=0.0)  # [BT, BK]
        b_do = tl.load(p_do, mask=m_tv, other=0.0)  # [BT, BV]
        b_qr = (b_q * (b_r * scale)[:, None]).to(b_q.dtype)
        b_dh = b_dh * b_keep + dot(tl.trans(b_qr), b_do, EXACT)
    p_dh0, _ = state_pointers(dh0, i_bh, o_k, m_k, o_v, m_v, DK, DV)
    tl.store(p_dh0, b_dh, mask=m_h)


@triton.jit
def _dqdk_bwd(q, k, v, do, g, seg, h, dh, dq, dk, scale, S, H, DK, DV, NT,
              BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, EXACT: tl.constexpr):
    """(d) One chunk's dq and dk (fp32) for one d_k block, summed over the d_v blocks."""
    i_t, i_k, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    o_t, m_t, b_r, b_w, b_keep, b_a = chunk_weights(g, seg, i_b, i_h, i_t, S, H, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < DK
    b_dq = tl.zeros([BT, BK], dtype=tl.float32)  # dO_i H_c^T
    b_dk = tl.zeros([BT, BK], dtype=tl.float32)  # v_j dH_{c+1}^T
    b_ds = tl.zeros([BT, BT], dtype=tl.float32)  # dO_i . v_j
    for i_v in range(tl.cdiv(DV, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < DV
        p_v, m_tv = token_pointers(v, i_b, i_h, o_t, m_t, o_v, m_v, S, H, DV)
        p_do, _ = token_pointers(do, i_b, i_h, o_t, m_t, o_v, m_v, S, H, DV)
        p_h, m_h = state_pointers(h, i_bh * NT + i_t, o_k, m_k, o_v, m_v, DK, DV)
        p_dh, _ = state_pointers(dh, i_bh * NT + i_t, o_k, m_k, o_v, m_v, DK, DV)
        b_v = tl.load(p_v, mask=m_tv, other=0.0)  # [BT, BV]
        b_do = tl.load(p_do, mask=m_tv, other=0.0)  # [BT, BV]
        b_h = tl.load(p_h, mask=m_h, other=0.0)  # [BK, BV]
        b_dh = tl.load(p_dh, mask=m_h, other=0.0)  # [BK, BV]
        b_dq += dot(b_do, tl.trans(b_h).to(b_do.dtype), EXACT)
        b_dk += dot(b_v, tl.trans(b_dh).to(b_v.dtype), EXACT)
        b_ds += dot(b_do, tl.trans(b_v), EXACT)
    p_q, m_tk = token_pointers(q, i_b, i_h, o_t, m_t, o_k, m_k, S, H, DK)
    p_k, _ = token_pointers(k, i_b, i_h, o_t, m_t, o_k, m_k, S, H, DK)
    b_q = tl.load(p_q, mask=m_tk, other=0.0)
    b_k = tl.load(p_k, mask=m_tk, other=0.0)
    b_ds = b_ds * b_a * scale  # dS_ij
    b_dq = b_dq * (b_r * scale)[:, None] + dot(b_ds.to(b_k.dtype), b_k, EXACT)
    b_dk = b_dk * b_w[:, None] + dot(tl.trans(b_ds).to(b_q.dtype), b_q, EXACT)
    p_dq, _ = token_pointers(dq, i_b, i_h, o_t, m_t, o_k, m_k, S, H, DK)
    p_dk, _ = token_pointers(dk, i_b, i_h, o_t, m_t, o_k, m_k, S, H, DK)
    tl.store(p_dq, b_dq, mask=m_tk)
    tl.store(p_dk, b_dk, mask=m_tk)


@triton.jit
def _dv_bwd(q, k, do, g, seg, dh, dv, scale, S, H, DK, DV, NT,
            BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, EXACT: tl.constexpr):
    """(d) One chunk's dv (fp32) for one d_v block, summed over the d_k blocks."""
    i_t, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    o_t, m_t, b_r, b_w, b_keep, b_a = chunk_weights(g, seg, i_b, i_h, i_t, S, H, BT)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < DV
    b_dv = tl.zeros([BT, BV], dtype=tl.float32)  # k_j dH_{c+1}
    b_s = tl.zeros([BT, BT], dtype=tl.float32)  # row j, column i: k_j . q_i
    for i_k in range(tl.cdiv(DK, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < DK
        p_q, m_tk = token_pointers(q, i_b, i_h, o_t, m_t, o_k, m_k, S, H, DK)
        p_k, _ = token_pointers(k, i_b, i_h, o_t, m_t, o_k, m_k, S, H, DK)
        p_dh, m_h = state_pointers(dh, i_bh * NT + i_t, o_k, m_k, o_v, m_v, DK, DV)
        b_q = tl.load(p_q, mask=m_tk, other=0.0)
        b_k = tl.load(p_k, mask=m_tk, other=0.0)
        b_dh = tl.load(p_dh, mask=m_h, other=0.0)
        b_dv += dot(b_k, b_dh.to(b_k.dtype), EXACT)
        b_s += dot(b_k, tl.trans(b_q), EXACT)
    p_do, m_tv = token_pointers(do, i_b, i_h, o_t, m_t, o_v, m_v, S, H, DV)
    b_do = tl.load(p_do, mask=m_tv, other=0.0)
    b_s = b_s * tl.trans(b_a) * scale
    b_dv = b_dv * b_w[:, None] + dot(b_s.to(b_do.dtype), b_do, EXACT)
    p_dv, _ = token_pointers(dv, i_b, i_h, o_t, m_t, o_v, m_v, S, H, DV)
    tl.store(p_dv, b_dv, mask=m_tv)


def _blocks(d_k: int, d_v: int) -> dict:
    """Chunk and head-dim blocks: small under the interpreter, so tests cross chunks and d blocks."""
    if interpreting():
        return dict(BT=16, BK=16, BV=16)
    return dict(BT=64, BK=block_size(d_k, hi=64), BV=block_size(d_v, hi=64), num_warps=4)


def _state_pass(k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, seg: torch.Tensor, h0: torch.Tensor,
                blocks: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(a) -> (incoming states [b, h, NT, d_k, d_v], final state [b, h, d_k, d_v]), fp32."""
    b, s, h, d_k = k.shape
    d_v, nt = v.shape[-1], triton.cdiv(s, blocks["BT"])
    states = new_output((b, h, nt, d_k, d_v), k, torch.float32)
    final = new_output((b, h, d_k, d_v), k, torch.float32)
    grid = (triton.cdiv(d_k, blocks["BK"]), triton.cdiv(d_v, blocks["BV"]), b * h)
    _state_fwd[grid](k, v, g, seg, h0, states, final, s, h, d_k, d_v, nt, EXACT=exact_dots(k.dtype), **blocks)
    return states, final


class _LinearAttention(torch.autograd.Function):
    """(out, final_state) = linear attention; backward recomputes the per-chunk states (module docstring)."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor | None,
                initial_state: torch.Tensor | None, resets: torch.Tensor | None,
                scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        b, s, h, d_k = q.shape
        d_v = v.shape[-1]
        blocks = _blocks(d_k, d_v)
        g = chunk_cumsum(expand_log_decay(log_decay, b, s, h, q.device), blocks["BT"]).contiguous()
        seg = segment_ids(resets, b, s, q.device)
        h0 = (q.new_zeros(b, h, d_k, d_v, dtype=torch.float32) if initial_state is None
              else initial_state.float().contiguous())
        states, final = _state_pass(k, v, g, seg, h0, blocks)
        out = new_output(v.shape, q)
        nt = states.shape[2]
        grid = (nt, triton.cdiv(d_v, blocks["BV"]), b * h)
        _output_fwd[grid](q, k, v, g, seg, states, out, scale, s, h, d_k, d_v, nt, EXACT=exact_dots(q.dtype), **blocks)
        ctx.save_for_backward(q, k, v, g, seg, h0)
        ctx.scale, ctx.blocks = scale, blocks
        ctx.decay_shape = None if log_decay is None else log_decay.shape
        ctx.decay_dtype = None if log_decay is None else log_decay.dtype
        ctx.state_dtype = None if initial_state is None else initial_state.dtype
        return out, final

    @staticmethod
    def backward(ctx, dout: torch.Tensor, dfinal: torch.Tensor):
        q, k, v, g, seg, h0 = ctx.saved_tensors
        scale, blocks = ctx.scale, ctx.blocks
        b, s, h, d_k = q.shape
        d_v = v.shape[-1]
        dout, dfinal = dout.to(q.dtype).contiguous(), dfinal.float().contiguous()
        states, final = _state_pass(k, v, g, seg, h0, blocks)  # recomputed: see "Memory" above
        nt, exact = states.shape[2], exact_dots(q.dtype)
        n_k, n_v = triton.cdiv(d_k, blocks["BK"]), triton.cdiv(d_v, blocks["BV"])
        dstates, dh0 = new_output(states.shape, states), new_output(h0.shape, h0)
        _state_bwd[(n_k, n_v, b * h)](q, dout, g, seg, dfinal, dstates, dh0, scale, s, h, d_k, d_v, nt,
                                      EXACT=exact, **blocks)
        dq, dk = new_output(q.shape, q, torch.float32), new_output(k.shape, k, torch.float32)
        dv = new_output(v.shape, v, torch.float32)
        _dqdk_bwd[(nt, n_k, b * h)](q, k, v, dout, g, seg, states, dstates, dq, dk, scale, s, h, d_k, d_v, nt,
                                    EXACT=exact, **blocks)
        _dv_bwd[(nt, n_v, b * h)](q, k, dout, g, seg, dstates, dv, scale, s, h, d_k, d_v, nt, EXACT=exact, **blocks)
        dlog_decay = None
        if ctx.needs_input_grad[3]:
            dg = (q.float() * dq).sum(-1) - (k.float() * dk).sum(-1)  # [b, s, h]
            # <dH_{c+1}, H_{c+1}> at each chunk's last token; H_{c+1}: the next chunk's incoming state, or the final
            edge = torch.cat([(dstates[:, :, :-1] * states[:, :, 1:]).sum((-2, -1)),
                              (dstates[:, :, -1] * final).sum((-2, -1))[..., None]], dim=-1)  # [b, h, NT]
            last = (torch.arange(1, nt + 1, device=q.device) * blocks["BT"]).clamp(max=s) - 1
            dg = dg.index_add(1, last, edge.transpose(1, 2))
            dlog_decay = chunk_cumsum(dg, blocks["BT"], reverse=True)  # [b, s, h]
            if len(ctx.decay_shape) == 1:
                dlog_decay = dlog_decay.sum((0, 1))  # the [h] form is shared by every b and s
            dlog_decay = dlog_decay.to(ctx.decay_dtype)
        dinitial = dh0.to(ctx.state_dtype) if ctx.needs_input_grad[4] else None
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dlog_decay, dinitial, None, None


def linear_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor | None,
                            *, scale: float, initial_state: torch.Tensor | None,
                            resets: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """reference.py's contract, differentiable in q, k, v, log_decay and initial_state, and taking a
    gradient on the final state. Inputs checked by the dispatch; q, k, v share one dtype."""
    q, k, v = (t.contiguous() for t in (q, k, v))
    return _LinearAttention.apply(q, k, v, log_decay, initial_state, resets, scale)
