"""Attention with log-sum-exp in Triton, forward and backward, flash-attention 2 style (arXiv:2307.08691).

The math is reference.py's. Each program holds one tile of queries (forward, dq) or keys (dk, dv)
and streams the other side through an online softmax, so memory is O(s) per call. Masks come
from positions (causal, bottom-right aligned) and from per-token document ids of the queries and
the keys, never from a dense [s_q, s_k] mask; a key tile whose documents do not meet the query
tile's is skipped, so packed short documents cost about their own length each. Grouped-query
attention is read in place: query head i uses kv head i // GROUP, and the dk/dv program of a kv
head loops over its GROUP query heads, so no gradient needs atomics.

Names follow fla: p_ pointers, b_ blocks, o_ offsets, m_ masks, CAPS constexprs.
Never run on a GPU yet: tested under TRITON_INTERPRET=1 only (see bench/RESULTS.md).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ithaca.kernels._alloc import new_output
from ithaca.kernels._backend import interpreting
from ithaca.kernels.triton_common import block_size, dot, exact_dots

LOG2E = math.log2(math.e)


@triton.jit
def _doc_range(p_doc, o_t, m_t):
    """A tile's document ids, and the smallest and largest among its valid tokens."""
    b_doc = tl.load(p_doc + o_t, mask=m_t, other=0)
    return b_doc, tl.min(tl.where(m_t, b_doc, 2147483647), 0), tl.max(tl.where(m_t, b_doc, -1), 0)


@triton.jit
def _rows(p, o_t, stride, o_d, m_t, m_d):
    """Rows o_t (stride apart) of one head, BLOCK_D columns: a [tokens, BLOCK_D] tile, 0 outside."""
    return tl.load(p + o_t[:, None] * stride + o_d[None, :], mask=m_t[:, None] & m_d[None, :], other=0.0)


@triton.jit
def _key_end(i_m, S_Q, S_K, BLOCK_M: tl.constexpr, IS_CAUSAL: tl.constexpr):
    """One past the last key the query tile i_m may read (causal: query i reads keys j <= i + S_K - S_Q)."""
    end = S_K
    if IS_CAUSAL:
        end = tl.minimum(S_K, (i_m + 1) * BLOCK_M + S_K - S_Q)
    return end


@triton.jit
def _scores(b_q, b_k, o_m, o_n, m_m, m_n, b_qdoc, b_kdoc, offset, scale_log2,
            IS_CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr, EXACT: tl.constexpr):
    """A tile's scores in log2 units [M, N], and which count: in range, causal (key j <= query i +
    offset), same document."""
    b_s = dot(b_q, tl.trans(b_k), EXACT) * scale_log2
    m_s = m_m[:, None] & m_n[None, :]
    if IS_CAUSAL:
        m_s = m_s & (o_n[None, :] <= o_m[:, None] + offset)
    if HAS_DOCS:
        m_s = m_s & (b_qdoc[:, None] == b_kdoc[None, :])
    return b_s, m_s


@triton.jit
def _lse_log2(lse, o_m, m_m):
    """Rows' log-sum-exp in log2 units; a row with lse -inf read no key, and +inf there makes its
    probabilities exp2(s - inf) = 0."""
    b_lse = tl.load(lse + o_m, mask=m_m, other=float("inf"))
    return tl.where(b_lse == float("-inf"), float("inf"), b_lse) * 1.4426950408889634


@triton.jit
def _attn_fwd(q, k, v, q_doc, k_doc, o, lse,
              s_qb, s_qs, s_qh, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh,
              S_Q, S_K, H, D, scale_log2,
              GROUP: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EXACT: tl.constexpr):
    """One tile of queries of one head: out and lse over every key tile it reads (online softmax)."""
    # int64: offsets such as (i_b * S_Q + row) * H * D pass 2^31 on 128K-token batches
    i_m, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    i_hkv = i_h // GROUP
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, BLOCK_D)
    m_m, m_d = o_m < S_Q, o_d < D
    b_q = _rows(q + i_b * s_qb + i_h * s_qh, o_m, s_qs, o_d, m_m, m_d)
    k += i_b * s_kb + i_hkv * s_kh
    v += i_b * s_vb + i_hkv * s_vh
    b_qdoc, q_lo, q_hi = o_m, 0, 0  # without documents these are never read
    if HAS_DOCS:
        b_qdoc, q_lo, q_hi = _doc_range(q_doc + i_b * S_Q, o_m, m_m)
    b_max = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max, log2 units
    b_sum = tl.zeros([BLOCK_M], tl.float32)
    b_acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, _key_end(i_m, S_Q, S_K, BLOCK_M, IS_CAUSAL), BLOCK_N):
        o_n = start + tl.arange(0, BLOCK_N)
        m_n = o_n < S_K
        b_kdoc, visit = o_n, True
        if HAS_DOCS:  # a key tile whose documents miss the query tile's holds nothing for it
            b_kdoc, k_lo, k_hi = _doc_range(k_doc + i_b * S_K, o_n, m_n)
            visit = (k_lo <= q_hi) & (q_lo <= k_hi)
        if visit:
            b_s, m_s = _scores(b_q, _rows(k, o_n, s_ks, o_d, m_n, m_d), o_m, o_n, m_m, m_n, b_qdoc, b_kdoc,
                               S_K - S_Q, scale_log2, IS_CAUSAL, HAS_DOCS, EXACT)
            b_s = tl.where(m_s, b_s, float("-inf"))
            b_new = tl.maximum(b_max, tl.max(b_s, 1))
            b_safe = tl.where(b_new == float("-inf"), 0.0, b_new)  # no key yet: exp2(-inf - 0) = 0, not NaN
            b_p = tl.exp2(b_s - b_safe[:, None])
            b_rescale = tl.exp2(b_max - b_safe)
            b_sum = b_sum * b_rescale + tl.sum(b_p, 1)
            b_v = _rows(v, o_n, s_vs, o_d, m_n, m_d)
            b_acc = b_acc * b_rescale[:, None] + dot(b_p.to(b_v.dtype), b_v, EXACT)
            b_max = b_new
    b_empty = b_sum == 0.0  # no allowed key at all: out 0, lse -inf
    b_out = b_acc / tl.where(b_empty, 1.0, b_sum)[:, None]
    b_lse = tl.where(b_empty, float("-inf"), (b_max + tl.log2(tl.where(b_empty, 1.0, b_sum))) / 1.4426950408889634)
    p_o = o + ((i_b * S_Q + o_m[:, None]) * H + i_h) * D + o_d[None, :]
    tl.store(p_o, b_out.to(o.dtype.element_ty), mask=m_m[:, None] & m_d[None, :])
    tl.store(lse + i_bh * S_Q + o_m, b_lse, mask=m_m)


@triton.jit
def _attn_bwd_dkdv(q, k, v, do, lse, delta, q_doc, k_doc, dk, dv,
                   s_qb, s_qs, s_qh, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_ob, s_os, s_oh,
                   S_Q, S_K, H, H_KV, D, scale, scale_log2,
                   GROUP: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EXACT: tl.constexpr):
    """One tile of keys of one kv head: dk, dv summed over its GROUP query heads and every query tile."""
    i_n, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)  # int64: see _attn_fwd
    i_b, i_hkv = i_bh // H_KV, i_bh % H_KV
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, BLOCK_D)
    m_n, m_d = o_n < S_K, o_d < D
    b_k = _rows(k + i_b * s_kb + i_hkv * s_kh, o_n, s_ks, o_d, m_n, m_d)
    b_v = _rows(v + i_b * s_vb + i_hkv * s_vh, o_n, s_vs, o_d, m_n, m_d)
    b_kdoc, k_lo, k_hi = o_n, 0, 0  # without documents these are never read
    if HAS_DOCS:
        b_kdoc, k_lo, k_hi = _doc_range(k_doc + i_b * S_K, o_n, m_n)
    b_dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    b_dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    offset = S_K - S_Q
    first = 0
    if IS_CAUSAL:  # queries before i_n * BLOCK_N - offset read none of these keys
        first = (tl.maximum(i_n * BLOCK_N - offset, 0) // BLOCK_M) * BLOCK_M
    for i_g in range(GROUP):
        i_h = i_hkv * GROUP + i_g
        for start in range(first, S_Q, BLOCK_M):
            o_m = start + tl.arange(0, BLOCK_M)
            m_m = o_m < S_Q
            b_qdoc, visit = o_m, True
            if HAS_DOCS:
                b_qdoc, q_lo, q_hi = _doc_range(q_doc + i_b * S_Q, o_m, m_m)
                visit = (k_lo <= q_hi) & (q_lo <= k_hi)
            if visit:
                b_q = _rows(q + i_b * s_qb + i_h * s_qh, o_m, s_qs, o_d, m_m, m_d)
                b_do = _rows(do + i_b * s_ob + i_h * s_oh, o_m, s_os, o_d, m_m, m_d)
                b_lse = _lse_log2(lse + (i_b * H + i_h) * S_Q, o_m, m_m)
                b_delta = tl.load(delta + (i_b * H + i_h) * S_Q + o_m, mask=m_m, other=0.0)
                b_s, m_s = _scores(b_q, b_k, o_m, o_n, m_m, m_n, b_qdoc, b_kdoc, offset, scale_log2,
                                   IS_CAUSAL, HAS_DOCS, EXACT)
                b_p = tl.where(m_s, tl.exp2(b_s - b_lse[:, None]), 0.0)  # [M, N]
                b_dv += dot(tl.trans(b_p.to(b_do.dtype)), b_do, EXACT)
                b_ds = b_p * (dot(b_do, tl.trans(b_v), EXACT) - b_delta[:, None])  # dS = P (dO V^T - D)
                b_dk += dot(tl.trans(b_ds.to(b_q.dtype)), b_q, EXACT)
    p_out = ((i_b * S_K + o_n[:, None]) * H_KV + i_hkv) * D + o_d[None, :]
    m_nd = m_n[:, None] & m_d[None, :]
    tl.store(dk + p_out, b_dk * scale, mask=m_nd)
    tl.store(dv + p_out, b_dv, mask=m_nd)


@triton.jit
def _attn_bwd_dq(q, k, v, do, lse, delta, q_doc, k_doc, dq,
                 s_qb, s_qs, s_qh, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_ob, s_os, s_oh,
                 S_Q, S_K, H, D, scale, scale_log2,
                 GROUP: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EXACT: tl.constexpr):
    """One tile of queries of one head: dq over every key tile it reads."""
    i_m, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)  # int64: see _attn_fwd
    i_b, i_h = i_bh // H, i_bh % H
    i_hkv = i_h // GROUP
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, BLOCK_D)
    m_m, m_d = o_m < S_Q, o_d < D
    b_q = _rows(q + i_b * s_qb + i_h * s_qh, o_m, s_qs, o_d, m_m, m_d)
    b_do = _rows(do + i_b * s_ob + i_h * s_oh, o_m, s_os, o_d, m_m, m_d)
    b_lse = _lse_log2(lse + i_bh * S_Q, o_m, m_m)
    b_delta = tl.load(delta + i_bh * S_Q + o_m, mask=m_m, other=0.0)
    k += i_b * s_kb + i_hkv * s_kh
    v += i_b * s_vb + i_hkv * s_vh
    b_qdoc, q_lo, q_hi = o_m, 0, 0  # without documents these are never read
    if HAS_DOCS:
        b_qdoc, q_lo, q_hi = _doc_range(q_doc + i_b * S_Q, o_m, m_m)
    b_dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, _key_end(i_m, S_Q, S_K, BLOCK_M, IS_CAUSAL), BLOCK_N):
        o_n = start + tl.arange(0, BLOCK_N)
        m_n = o_n < S_K
        b_kdoc, visit = o_n, True
        if HAS_DOCS:
            b_kdoc, k_lo, k_hi = _doc_range(k_doc + i_b * S_K, o_n, m_n)
            visit = (k_lo <= q_hi) & (q_lo <= k_hi)
        if visit:
            b_k = _rows(k, o_n, s_ks, o_d, m_n, m_d)
            b_s, m_s = _scores(b_q, b_k, o_m, o_n, m_m, m_n, b_qdoc, b_kdoc, S_K - S_Q, scale_log2,
                               IS_CAUSAL, HAS_DOCS, EXACT)
            b_p = tl.where(m_s, tl.exp2(b_s - b_lse[:, None]), 0.0)
            b_ds = b_p * (dot(b_do, tl.trans(_rows(v, o_n, s_vs, o_d, m_n, m_d)), EXACT) - b_delta[:, None])
            b_dq += dot(b_ds.to(b_k.dtype), b_k, EXACT)
    tl.store(dq + ((i_b * S_Q + o_m[:, None]) * H + i_h) * D + o_d[None, :], b_dq * scale,
             mask=m_m[:, None] & m_d[None, :])


def _blocks(d: int) -> dict:
    """Tile sizes: small under the interpreter (tests cover several tiles on short, ragged inputs)."""
    if interpreting():
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_D=block_size(d))
    return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=block_size(d, hi=256), num_warps=4 if d <= 64 else 8, num_stages=2)


def _last_dim_contiguous(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t if t.stride(-1) == 1 else t.contiguous() for t in tensors]


def _docs(q_doc_ids: torch.Tensor | None, k_doc_ids: torch.Tensor | None, q: torch.Tensor) -> tuple:
    """Document ids as the kernels read them: int32 (the dispatch documents that ids must fit)."""
    if q_doc_ids is None:
        return q, q, False  # unused pointers: HAS_DOCS=False never reads them
    return q_doc_ids.to(torch.int32).contiguous(), k_doc_ids.to(torch.int32).contiguous(), True


def attention_lse_fwd_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, is_causal: bool, scale: float,
                             q_doc_ids: torch.Tensor | None = None,
                             k_doc_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (out [b, s_q, h, d] in q's dtype, lse [b, h, s_q] fp32); reference.py's contract."""
    q, k, v = _last_dim_contiguous(q, k, v)
    b, s_q, h, d = q.shape
    s_k, h_kv = k.shape[1], k.shape[2]
    out = new_output((b, s_q, h, d), q)
    lse = new_output((b, h, s_q), q, torch.float32)
    q_docs, k_docs, has_docs = _docs(q_doc_ids, k_doc_ids, q)
    blocks = _blocks(d)
    grid = (triton.cdiv(s_q, blocks["BLOCK_M"]), b * h)
    _attn_fwd[grid](q, k, v, q_docs, k_docs, out, lse, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
                    s_q, s_k, h, d, scale * LOG2E, GROUP=h // h_kv, IS_CAUSAL=is_causal, HAS_DOCS=has_docs,
                    EXACT=exact_dots(q.dtype), **blocks)
    return out, lse


def attention_lse_bwd_triton(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                             lse: torch.Tensor, *, is_causal: bool, scale: float,
                             q_doc_ids: torch.Tensor | None = None,
                             k_doc_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients from the final (out, lse) -> (dq, dk, dv) fp32; reference.py's contract."""
    q, k, v, dout = _last_dim_contiguous(q, k, v, dout.to(q.dtype))  # tl.dot takes one dtype on a GPU
    b, s_q, h, d = q.shape
    s_k, h_kv = k.shape[1], k.shape[2]
    delta = (dout.float() * out.float()).sum(-1).transpose(1, 2).contiguous()  # D = rowsum(dO * O): [b, h, s_q]
    lse = lse.float().contiguous()
    dq = new_output(q.shape, q, torch.float32)
    dk = new_output(k.shape, k, torch.float32)
    dv = new_output(v.shape, v, torch.float32)
    q_docs, k_docs, has_docs = _docs(q_doc_ids, k_doc_ids, q)
    blocks = _blocks(d)
    common = dict(GROUP=h // h_kv, IS_CAUSAL=is_causal, HAS_DOCS=has_docs, EXACT=exact_dots(q.dtype), **blocks)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *dout.stride()[:3])
    _attn_bwd_dkdv[(triton.cdiv(s_k, blocks["BLOCK_N"]), b * h_kv)](
        q, k, v, dout, lse, delta, q_docs, k_docs, dk, dv, *strides, s_q, s_k, h, h_kv, d, scale, scale * LOG2E,
        **common)
    _attn_bwd_dq[(triton.cdiv(s_q, blocks["BLOCK_M"]), b * h)](
        q, k, v, dout, lse, delta, q_docs, k_docs, dq, *strides, s_q, s_k, h, d, scale, scale * LOG2E, **common)
    return dq, dk, dv
