"""The gated delta rule in Triton, forward and backward (issue #15's "Triton kernel for the local part").

The chunk structure is fla's chunk_gated_delta_rule (fla-org/flash-linear-attention,
fla/ops/gated_delta_rule): per chunk the UT transform's triangular solve, a serial state pass over
chunks, then an output pass; backward the same in reverse. The code is ours and the math is
chunked.py's, whose docstring derives it with resets. Per (batch row, head) the sequence is cut
into chunks of BT tokens (32 on a GPU, where 64 overflows shared memory: see _blocks; 16 under
the interpreter, so tests cross chunks); the last chunk may be shorter and is masked. Torch
prepares g (the inclusive cumsum of log_decay inside each chunk) and seg (the cumsum of resets
along s), and the masks of triton_common.chunk_weights (shared with linear_attention, so the two
ops read resets identically) give, for chunk c with last token L:

    r_i  = reach_i,  e_j = end_j,  keep = carry,  D_ij (j <= i, same document)    (chunked.py's names)
    L_ij = beta_i D_ij (k_i . k_j) for j < i,   T = (I + L)^-1 (unit lower triangular)
    W = T diag(beta r) K [BT, d_k],   U0 = T diag(beta) V [BT, d_v]

Forward, S [d_k, d_v] fp32 per (b, h):
  (a) _delta_prepare_fwd, grid (chunks, b*h): T by forward substitution (BT rows,
      T_i = e_i - sum_j L_ij T_j), then W and U0, stored fp32 per token.
  (b) _delta_state_fwd, grid (d_v blocks, b*h), serial over chunks; column blocks of S are independent
      because everything acts on S from the d_k side:
        U_c = U0 - W S_c  (the deltas),   S_{c+1} = keep S_c + (diag(e) K)^T U_c
      stores each chunk's incoming S_c into [b, h, NT, d_k, d_v], U into [b, s, h, d_v], the final S.
  (c) _delta_output_fwd, grid (chunks, d_v blocks, b*h):
        O = scale diag(r) Q S_c + P U,   P = scale (Q K^T) * D

Backward, from dO and dS_NT (the final state's gradient; zeros if it has none):
  (d) _delta_state_bwd, grid (d_v blocks, b*h), chunks in reverse; dS', the gradient of the state leaving chunk c:
        dU = P^T dO + diag(e) K dS',   dS_c = keep dS' + scale Q^T diag(r) dO - W^T dU
      stores dS' per chunk, dU per token, and d initial_state = dS_0.
  (e) _delta_chunk_bwd, grid (chunks, b*h), looping over d_v blocks for the sums over d_v:
        dW = -dU S_c^T,  dT = dU (diag(beta) V)^T + dW (diag(beta r) K)^T,  dL = -T^T dT T^T (strict lower)
        dV = diag(beta) T^T dU,   dK_b = T^T dW (through W's diag(beta r) K)
        dQ = scale diag(r) dO S_c^T + dP~ K,   dP~ = scale (dO U^T) * D
        dK = dP~^T Q + diag(e) U dS'^T + diag(beta r) dK_b + G K + G^T K,   G = diag(beta) (dL * D)
        dbeta = rowsum(dV0 * V) + r rowsum(dK_b * K) + rowsum(dL * D * K K^T)   (dV0 = T^T dU)
      and the gradient of each chunk-local g_i, from every factor that holds one: P and L (each
      exp(g_i - g_j): +row sums, -column sums of dX * X), r (r_i dr_i), e (-e_j de_j, and their
      sum at L), keep (keep <dS', S_c> at L). Torch turns dg into d log_decay
      by a reverse cumsum inside each chunk (the [h] form sums over b and s).
A term a mask removes is zero in the forward and in every gradient, so the masks carry over.

Memory: T is recomputed wherever it is needed; the per-chunk states and U are not saved for
backward but recomputed there by (a) and (b); forward saves q, k, v, beta, g, seg, S_0.
`delta_rule_transition_triton` runs the same kernels on [V | 0] from S_0 = [0 | I] (the columns
of A are states too, with no values written) without the output pass: final = [B | A].

Limits: d_k <= MAX_DK (one block of keys per program: the solve and the scores need whole
keys); d_v is blocked and has no limit. Loads are upcast to fp32 and every product accumulates
in fp32; the dots multiply in IEEE fp32 for fp32 inputs and under the interpreter, in TF32 for
bf16/fp16 inputs on a GPU (triton_common.exact_dots). Outputs and dq, dk, dv come back in the
inputs' dtypes; the final state fp32.
Names follow fla: p_ pointers, b_ blocks, o_ offsets, m_ masks, CAPS constexprs.
Never run on a GPU yet: tested under TRITON_INTERPRET=1, and compiled for sm_90 (d_k 64, 128, 256;
bf16 and fp32) within its shared memory, without a device; tests/kernels/test_compile_for_gpu.py
keeps bf16 at d_k=128 and fp32 at d_k=256 (the most shared memory: 184 KiB in _delta_chunk_bwd).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ithaca.kernels._alloc import new_output
from ithaca.kernels._backend import interpreting
from ithaca.kernels.delta_rule.limits import MAX_DK
from ithaca.kernels.linear_attention.reference import expand_log_decay
from ithaca.kernels.triton_common import (block_size, chunk_cumsum, chunk_weights, dot, exact_dots, segment_ids,
                                           state_pointers, token_pointers)


@triton.jit
def _load_tokens(x, i_b, i_h, o_t, m_t, o_d, m_d, S, H, D):
    """A [BT, BD] block of a contiguous [b, s, h, D] tensor as fp32, zeros outside the masks."""
    p_x, m_x = token_pointers(x, i_b, i_h, o_t, m_t, o_d, m_d, S, H, D)
    return tl.load(p_x, mask=m_x, other=0.0).to(tl.float32)


@triton.jit
def _store_tokens(x, b_x, i_b, i_h, o_t, m_t, o_d, m_d, S, H, D):
    p_x, m_x = token_pointers(x, i_b, i_h, o_t, m_t, o_d, m_d, S, H, D)
    tl.store(p_x, b_x.to(x.dtype.element_ty), mask=m_x)


@triton.jit
def _solve(b_k, b_beta, b_d, BT: tl.constexpr, EXACT: tl.constexpr):
    """T = (I + L)^-1 with L_ij = beta_i D_ij (k_i . k_j) for j < i, row by row: T_i = e_i - sum_{j<i} L_ij T_j
    (rows j < i are final when row i is formed; row i starts as e_i). Returns (T, L), [BT, BT] fp32."""
    o_i = tl.arange(0, BT)
    m_strict = o_i[:, None] > o_i[None, :]
    b_l = tl.where(m_strict, b_beta[:, None] * dot(b_k, tl.trans(b_k), EXACT) * b_d, 0.0)
    b_t = (o_i[:, None] == o_i[None, :]).to(tl.float32)
    for i in range(1, BT):
        b_li = tl.sum(tl.where(o_i[:, None] == i, b_l, 0.0), 0)  # row i of L [BT]
        b_lt = tl.sum(b_li[:, None] * b_t, 0)  # sum_j L_ij T_j [BT]
        b_t = tl.where(o_i[:, None] == i, b_t - b_lt[None, :], b_t)
    return b_t, b_l


@triton.jit
def _delta_prepare_fwd(k, v, beta, g, seg, w, u0, S, H, DK, DV,
                       BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, EXACT: tl.constexpr):
    """(a) One chunk's W [BT, DK] and U0 [BT, DV] (fp32, per token) from its solve."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    o_t, m_t, b_r, b_e, b_keep, b_d = chunk_weights(g, seg, i_b, i_h, i_t, S, H, BT)
    o_k = tl.arange(0, BK)
    m_k = o_k < DK
    b_k = _load_tokens(k, i_b, i_h, o_t, m_t, o_k, m_k, S, H, DK)  # [BT, BK]
    b_beta = tl.load(beta + (i_b * S + o_t) * H + i_h, mask=m_t, other=0.0).to(tl.float32)  # [BT]
    b_t, b_l = _solve(b_k, b_beta, b_d, BT, EXACT)
    b_w = dot(b_t, b_k * (b_beta * b_r)[:, None], EXACT)
    _store_tokens(w, b_w, i_b, i_h, o_t, m_t, o_k, m_k, S, H, DK)
    for i_v in range(tl.cdiv(DV, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < DV
        b_v = _load_tokens(v, i_b, i_h, o_t, m_t, o_v, m_v, S, H, DV)  # [BT, BV]
        _store_tokens(u0, dot(b_t, b_v * b_beta[:, None], EXACT), i_b, i_h, o_t, m_t, o_v, m_v, S, H, DV)


@triton.jit
def _delta_state_fwd(k, w, u0, g, seg, h0, h, u, ht, S, H, DK, DV, NT,
                     BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, EXACT: tl.constexpr):
    """(b) Serial over chunks: incoming states into h [b, h, NT, DK, DV], deltas U into u, final state into ht."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    o_k, o_v = tl.arange(0, BK), i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < DK, o_v < DV
    p_h0, m_h = state_pointers(h0, i_bh, o_k, m_k, o_v, m_v, DK, DV)
    b_h = tl.load(p_h0, mask=m_h, other=0.0)  # [BK, BV]
    for i_t in range(NT):
        p_h, _ = state_pointers(h, i_bh * NT + i_t, o_k, m_k, o_v, m_v, DK, DV)
        tl.store(p_h, b_h, mask=m_h)
        o_t, m_t, b_r, b_e, b_keep, b_d = chunk_weights(g, seg, i_b, i_h, i_t, S, H, BT)
        b_k = _load_tokens(k, i_b, i_h, o_t, m_t, o_k, m_k, S, H, DK)  # [BT, BK]
        b_w = _load_tokens(w, i_b, i_h, o_t, m_t, o_k, m_k, S, H, DK)  # [BT, BK]
        b_u = _load_tokens(u0, i_b, i_h, o_t, m_t, o_v, m_v, S, H, DV) - dot(b_w, b_h, EXACT)  # [BT, BV]
        _store_tokens(u, b_u, i_b, i_h, o_t, m_t, o_v, m_v, S, H, DV)
        b_h = b_h * b_keep + dot(tl.trans(b_k * b_e[:, None]), b_u, EXACT)
    p_ht, _ = state_pointers(ht, i_bh, o_k, m_k, o_v, m_v, DK, DV)
    tl.store(p_ht, b_h, mask=m_h)


@triton.jit
def _delta_output_fwd(q, k, u, g, seg, h, o, scale, S, H, DK, DV, NT,
                      BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, EXACT: tl.constexpr):
    """(c) One chunk's outputs for one d_v block: the incoming state's part plus the deltas' within-chunk part."""
    i_t, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    o_t, m_t, b_r, b_e, b_keep, b_d = chunk_weights(g, seg, i_b, i_h, i_t, S, H, BT)
    o_k, o_v = tl.arange(0, BK), i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < DK, o_v < DV
    b_q = _load_tokens(q, i_b, i_h, o_t, m_t, o_k, m_k, S, H, DK)
    b_k = _load_tokens(k, i_b, i_h, o_t, m_t, o_k, m_k, S, H, DK)
    b_u = _load_tokens(u, i_b, i_h, o_t, m_t, o_v, m_v, S, H, DV)
    p_h, m_h = state_pointers(h, i_bh * NT + i_t, o_k, m_k, o_v, m_v, DK, DV)
    b_h = tl.load(p_h, mask=m_h, other=0.0)
    b_p = dot(b_q, tl.trans(b_k), EXACT) * b_d  # [BT, BT]
    b_o = (dot(b_q, b_h, EXACT) * b_r[:, None] + dot(b_p, b_u, EXACT)) * scale
    _store_tokens(o, b_o, i_b, i_h, o_t, m_t, o_v, m_v, S, H, DV)


@triton.jit
def _delta_state_bwd(q, k, w, do, g, seg, dht, dh, du, dh0, scale, S, H, DK, DV, NT,
                     BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, EXACT: tl.constexpr):
    """(d) Chunks in reverse: dh[b, h, c] = dS', the gradient of the state leaving chunk c; dU per token; dh0."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    o_k, o_v = tl.arange(0, BK), i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < DK, o_v < DV
    p_dht, m_h = state_pointers(dht, i_bh, o_k, m_k, o_v, m_v, DK, DV)
    b_dh = tl.load(p_dht, mask=m_h, other=0.0)  # [BK, BV]
    for i_r in range(NT):
        i_t = NT - 1 - i_r
        p_dh, _ = state_pointers(dh, i_bh * NT + i_t, o_k, m_k, o_v, m_v, DK, DV)
        tl.store(p_dh, b_dh, mask=m_h)
        o_t, m_t, b_r, b_e, b_keep, b_d = chunk_weights(g, seg, i_b, i_h, i_t, S, H, BT)
        b_q = _load_tokens(q, i_b, i_h, o_t, m_t, o_k, m_k, S, H, DK)
        b_k = _load_tokens(k, i_b, i_h, o_t, m_t, o_k, m_k, S, H, DK)
        b_w = _load_tokens(w, i_b, i_h, o_t, m_t, o_k, m_k, S, H, DK)
        b_do = _load_tokens(do, i_b, i_h, o_t, m_t, o_v, m_v, S, H, DV)  # [BT, BV]
        b_p = dot(b_q, tl.trans(b_k), EXACT) * b_d * scale  # P [BT, BT]
        b_du = dot(tl.trans(b_p), b_do, EXACT) + dot(b_k * b_e[:, None], b_dh, EXACT)  # [BT, BV]
        _store_tokens(du, b_du, i_b, i_h, o_t, m_t, o_v, m_v, S, H, DV)
        b_dh = (b_dh * b_keep + dot(tl.trans(b_q * (b_r * scale)[:, None]), b_do, EXACT)
                - dot(tl.trans(b_w), b_du, EXACT))
    p_dh0, _ = state_pointers(dh0, i_bh, o_k, m_k, o_v, m_v, DK, DV)
    tl.store(p_dh0, b_dh, mask=m_h)


@triton.jit
def _delta_chunk_bwd(q, k, v, beta, g, seg, h, dh, u, du, do, dq, dk, dv, dbeta, dg, scale, S, H, DK, DV, NT,
                     BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, EXACT: tl.constexpr):
    """(e) One chunk's dq, dk, dv, dbeta and dg (the chunk-local g's gradient), fp32 per token."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    o_t, m_t, b_r, b_e, b_keep, b_d = chunk_weights(g, seg, i_b, i_h, i_t, S, H, BT)
    o_k = tl.arange(0, BK)
    m_k = o_k < DK
    b_q = _load_tokens(q, i_b, i_h, o_t, m_t, o_k, m_k, S, H, DK)  # [BT, BK]
    b_k = _load_tokens(k, i_b, i_h, o_t, m_t, o_k, m_k, S, H, DK)  # [BT, BK]
    b_beta = tl.load(beta + (i_b * S + o_t) * H + i_h, mask=m_t, other=0.0).to(tl.float32)  # [BT]
    b_t, b_l = _solve(b_k, b_beta, b_d, BT, EXACT)
    b_kb = b_k * (b_beta * b_r)[:, None]  # diag(beta r) K: W = T K_b
    b_dos = tl.zeros([BT, BK], dtype=tl.float32)  # dO S_c^T
    b_dp = tl.zeros([BT, BT], dtype=tl.float32)  # dO U^T
    b_dw = tl.zeros([BT, BK], dtype=tl.float32)  # -dU S_c^T
    b_dke = tl.zeros([BT, BK], dtype=tl.float32)  # U dS'^T: the gradient of diag(e) K
    b_dt = tl.zeros([BT, BT], dtype=tl.float32)  # dT
    b_dbeta = tl.zeros([BT], dtype=tl.float32)
    b_dkeep = 0.0  # <dS', S_c>
    for i_v in range(tl.cdiv(DV, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < DV
        b_v = _load_tokens(v, i_b, i_h, o_t, m_t, o_v, m_v, S, H, DV)  # [BT, BV]
        b_u = _load_tokens(u, i_b, i_h, o_t, m_t, o_v, m_v, S, H, DV)
        b_du = _load_tokens(du, i_b, i_h, o_t, m_t, o_v, m_v, S, H, DV)
        b_do = _load_tokens(do, i_b, i_h, o_t, m_t, o_v, m_v, S, H, DV)
        p_h, m_h = state_pointers(h, i_bh * NT + i_t, o_k, m_k, o_v, m_v, DK, DV)
        p_dh, _ = state_pointers(dh, i_bh * NT + i_t, o_k, m_k, o_v, m_v, DK, DV)
        b_h = tl.load(p_h, mask=m_h, other=0.0)  # [BK, BV]
        b_dh = tl.load(p_dh, mask=m_h, other=0.0)  # [BK, BV]
        b_dos += dot(b_do, tl.trans(b_h), EXACT)
        b_dp += dot(b_do, tl.trans(b_u), EXACT)
        b_dw -= dot(b_du, tl.trans(b_h), EXACT)
        b_dke += dot(b_u, tl.trans(b_dh), EXACT)
        b_dkeep += tl.sum(b_h * b_dh)
        b_dt += dot(b_du, tl.trans(b_v * b_beta[:, None]), EXACT)  # through U0 = T diag(beta) V
        b_dv0 = dot(tl.trans(b_t), b_du, EXACT)  # gradient of diag(beta) V
        _store_tokens(dv, b_dv0 * b_beta[:, None], i_b, i_h, o_t, m_t, o_v, m_v, S, H, DV)
        b_dbeta += tl.sum(b_dv0 * b_v, 1)
    b_dt += dot(b_dw, tl.trans(b_kb), EXACT)  # through W = T K_b
    b_dkb = dot(tl.trans(b_t), b_dw, EXACT)
    o_i = tl.arange(0, BT)
    b_dl = -dot(tl.trans(b_t), dot(b_dt, tl.trans(b_t), EXACT), EXACT)
    b_dl = tl.where(o_i[:, None] > o_i[None, :], b_dl, 0.0)  # L is strictly lower
    b_dld = b_dl * b_d  # the gradient of beta_i (k_i . k_j)
    b_p = dot(b_q, tl.trans(b_k), EXACT) * b_d * scale  # P
    b_dps = b_dp * b_d * scale  # the gradient of q_i . k_j through P
    b_dq = b_dos * (b_r * scale)[:, None] + dot(b_dps, b_k, EXACT)
    b_gb = b_dld * b_beta[:, None]  # G: the gradient of k_i . k_j through L
    b_dk = (dot(tl.trans(b_dps), b_q, EXACT) + b_dke * b_e[:, None] + b_dkb * (b_beta * b_r)[:, None]
            + dot(b_gb, b_k, EXACT) + dot(tl.trans(b_gb), b_k, EXACT))
    b_dkbk = tl.sum(b_dkb * b_k, 1)  # dK_b . k_i
    b_dbeta += b_r * b_dkbk + tl.sum(b_dld * dot(b_k, tl.trans(b_k), EXACT), 1)
    b_dr = scale * tl.sum(b_q * b_dos, 1) + b_beta * b_dkbk
    b_z = b_dp * b_p  # P_ij holds exp(g_i - g_j)
    b_y = b_dl * b_l  # so does L_ij
    b_de = tl.sum(b_k * b_dke, 1) * b_e  # e_j holds exp(g_L - g_j)
    b_dg = tl.sum(b_z, 1) - tl.sum(b_z, 0) + tl.sum(b_y, 1) - tl.sum(b_y, 0) + b_r * b_dr - b_de
    i_last = tl.minimum(i_t * BT + BT, S) - 1
    b_dg += tl.where(o_t == i_last, tl.sum(b_de) + b_keep * b_dkeep, 0.0)  # g_L: e's and keep's exp(g_L)
    _store_tokens(dq, b_dq, i_b, i_h, o_t, m_t, o_k, m_k, S, H, DK)
    _store_tokens(dk, b_dk, i_b, i_h, o_t, m_t, o_k, m_k, S, H, DK)
    tl.store(dbeta + (i_b * S + o_t) * H + i_h, b_dbeta, mask=m_t)
    tl.store(dg + (i_b * S + o_t) * H + i_h, b_dg, mask=m_t)


def _blocks(d_k: int, d_v: int) -> dict:
    """Chunk and block sizes: small under the interpreter, so tests cross chunks and d_v blocks.
    Keys are always one block (BK covers d_k). On a GPU, BT=32 and one stage: compiled for sm_90,
    _delta_chunk_bwd needs 272 KiB of shared memory at BT=64, d_k=128, bf16 (an SM has 227 KiB) and
    104 KiB at BT=32 fp32; with 3 stages _delta_state_fwd at d_k=256 needs 321 KiB."""
    if interpreting():
        return dict(BT=16, BK=block_size(d_k, hi=MAX_DK), BV=16)
    return dict(BT=32, BK=block_size(d_k, hi=MAX_DK), BV=block_size(d_v, hi=64), num_warps=4, num_stages=1)


def _forward_states(k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, g: torch.Tensor, seg: torch.Tensor,
                    h0: torch.Tensor, blocks: dict) -> tuple[torch.Tensor, ...]:
    """(a) and (b) -> (W [b, s, h, d_k], incoming states [b, h, NT, d_k, d_v], U [b, s, h, d_v], final state), fp32."""
    b, s, h, d_k = k.shape
    d_v, nt, exact = v.shape[-1], triton.cdiv(s, blocks["BT"]), exact_dots(k.dtype)
    w = new_output(k.shape, k, torch.float32)
    u0, u = new_output(v.shape, v, torch.float32), new_output(v.shape, v, torch.float32)
    _delta_prepare_fwd[(nt, b * h)](k, v, beta, g, seg, w, u0, s, h, d_k, d_v, EXACT=exact, **blocks)
    states = new_output((b, h, nt, d_k, d_v), k, torch.float32)
    final = new_output((b, h, d_k, d_v), k, torch.float32)
    _delta_state_fwd[(triton.cdiv(d_v, blocks["BV"]), b * h)](k, w, u0, g, seg, h0, states, u, final, s, h, d_k, d_v,
                                                              nt, EXACT=exact, **blocks)
    return w, states, u, final


class _DeltaRule(torch.autograd.Function):
    """(out, final_state) = the gated delta rule; backward recomputes W, U and the per-chunk states."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                log_decay: torch.Tensor | None, initial_state: torch.Tensor | None, resets: torch.Tensor | None,
                scale: float, with_output: bool) -> tuple[torch.Tensor, torch.Tensor]:
        b, s, h, d_k = q.shape
        d_v = v.shape[-1]
        blocks = _blocks(d_k, d_v)
        g = chunk_cumsum(expand_log_decay(log_decay, b, s, h, q.device), blocks["BT"]).contiguous()
        seg = segment_ids(resets, b, s, q.device)
        h0 = (q.new_zeros(b, h, d_k, d_v, dtype=torch.float32) if initial_state is None
              else initial_state.float().contiguous())
        _, states, u, final = _forward_states(k, v, beta, g, seg, h0, blocks)
        out = new_output(v.shape, q)
        if with_output:
            nt = states.shape[2]
            _delta_output_fwd[(nt, triton.cdiv(d_v, blocks["BV"]), b * h)](q, k, u, g, seg, states, out, scale, s, h,
                                                                          d_k, d_v, nt, EXACT=exact_dots(q.dtype),
                                                                          **blocks)
        ctx.save_for_backward(q, k, v, beta, g, seg, h0)
        ctx.scale, ctx.blocks = scale, blocks
        ctx.decay_shape = None if log_decay is None else log_decay.shape
        ctx.decay_dtype = None if log_decay is None else log_decay.dtype
        ctx.state_dtype = None if initial_state is None else initial_state.dtype
        return out, final

    @staticmethod
    def backward(ctx, dout: torch.Tensor | None, dfinal: torch.Tensor | None):
        q, k, v, beta, g, seg, h0 = ctx.saved_tensors
        scale, blocks = ctx.scale, ctx.blocks
        b, s, h, d_k = q.shape
        d_v = v.shape[-1]
        dout = torch.zeros_like(v, dtype=q.dtype) if dout is None else dout.to(q.dtype).contiguous()
        dfinal = h0.new_zeros(h0.shape) if dfinal is None else dfinal.float().contiguous()
        w, states, u, final = _forward_states(k, v, beta, g, seg, h0, blocks)  # recomputed: see "Memory" above
        nt, exact = states.shape[2], exact_dots(q.dtype)
        dstates, dh0 = new_output(states.shape, states), new_output(h0.shape, h0)
        du = new_output(v.shape, v, torch.float32)
        _delta_state_bwd[(triton.cdiv(d_v, blocks["BV"]), b * h)](q, k, w, dout, g, seg, dfinal, dstates, du, dh0,
                                                                  scale, s, h, d_k, d_v, nt, EXACT=exact, **blocks)
        dq, dk = new_output(q.shape, q, torch.float32), new_output(k.shape, k, torch.float32)
        dv = new_output(v.shape, v, torch.float32)
        dbeta, dg = new_output(beta.shape, beta, torch.float32), new_output(beta.shape, beta, torch.float32)
        _delta_chunk_bwd[(nt, b * h)](q, k, v, beta, g, seg, states, dstates, u, du, dout, dq, dk, dv, dbeta, dg,
                                      scale, s, h, d_k, d_v, nt, EXACT=exact, **blocks)
        dlog_decay = None
        if ctx.needs_input_grad[4]:
            dlog_decay = chunk_cumsum(dg, blocks["BT"], reverse=True)  # g_i sums log_decay_t over t <= i in the chunk
            if len(ctx.decay_shape) == 1:
                dlog_decay = dlog_decay.sum((0, 1))  # the [h] form is shared by every b and s
            dlog_decay = dlog_decay.to(ctx.decay_dtype)
        dinitial = dh0.to(ctx.state_dtype) if ctx.needs_input_grad[5] else None
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dbeta.to(beta.dtype), dlog_decay, dinitial,
                None, None, None)


def check_triton_head_dims(op: str, d_k: int) -> None:
    """Raise ValueError unless the keys fit the kernels' one block (MAX_DK)."""
    if d_k > MAX_DK:
        raise ValueError(f"{op}: impl='triton' takes d_k <= {MAX_DK} (keys are one block per program); got "
                         f"d_k={d_k}: use impl='chunked'")


def delta_rule_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, *,
                      log_decay: torch.Tensor | None, scale: float, resets: torch.Tensor | None,
                      initial_state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """reference.py's contract (out [b, s, h, d_v] in q's dtype, final state fp32, always returned),
    differentiable in q, k, v, beta, log_decay and initial_state, and taking a gradient on the final
    state. Inputs checked by the dispatch; q, k, v share one dtype; d_k <= MAX_DK."""
    check_triton_head_dims("delta_rule", q.shape[-1])
    q, k, v, beta = (t.contiguous() for t in (q, k, v, beta))
    return _DeltaRule.apply(q, k, v, beta, log_decay, initial_state, resets, scale, True)


def delta_rule_transition_triton(k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, *,
                                 log_decay: torch.Tensor | None,
                                 resets: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """chunked.py's delta_rule_transition contract -> (A [b, h, d_k, d_k], B [b, h, d_k, d_v]) fp32,
    differentiable: the state pass on values [V | 0] from [0 | I], whose final state is [B | A]."""
    b, s, h, d_k = k.shape
    d_v = v.shape[-1]
    check_triton_head_dims("delta_rule_transition", d_k)
    k, beta = k.contiguous(), beta.contiguous()
    v_wide = torch.cat([v, v.new_zeros(b, s, h, d_k)], dim=-1)  # [b, s, h, d_v + d_k]
    h0 = torch.cat([k.new_zeros(b, h, d_k, d_v, dtype=torch.float32),
                    torch.eye(d_k, device=k.device).expand(b, h, d_k, d_k)], dim=-1)  # [0 | I]
    _, final = _DeltaRule.apply(k, k, v_wide, beta, log_decay, h0, resets, 1.0, False)  # q unused: no output pass
    return final[..., d_v:], final[..., :d_v]
