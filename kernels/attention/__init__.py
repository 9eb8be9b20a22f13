"""Softmax attention: one dispatch for whole attention (`attention`) and for the ring step
(`attention_lse_fwd` / `attention_lse_bwd`, which return and take the log-sum-exp).

Implementations; the math is in reference.py:
  flash      flash-attn 2 (optional `gpu` extra; CUDA, fp16/bf16): no mask but causal, or (whole
             attention only) documents through its varlen kernel
  triton     ours (triton.py): causal, document ids, GQA, fp32/bf16; a CUDA tensor, or the CPU
             under TRITON_INTERPRET=1
  tiled      PyTorch tile by tile with an online softmax (tiled.py): documents, O(s) memory, any device
  sdpa, cpu  torch's fused kernels (SDPA; its CPU flash kernel for the ring step): no document masks
  reference  dense fp32 scores: the spec, O(s_q * s_k) memory
"auto" picks, on CUDA, flash-attn where it applies and Triton elsewhere; off CUDA, torch's fused
kernel without documents and the tiled form with them. No path that "auto" takes holds dense
scores. Each call logs once which implementation runs and why.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from ithaca.kernels._backend import choose, flash_attn_installed, triton_runs
from ithaca.kernels.attention.reference import (attention_lse_bwd_reference, attention_lse_fwd_reference,
                                                attention_reference)
from ithaca.kernels.attention.shapes import check_attention_inputs, repeat_kv_heads
from ithaca.kernels.attention.tiled import attention_lse_bwd_tiled, attention_lse_fwd_tiled

__all__ = ["AttentionImpl", "LseImpl", "attention", "attention_lse_bwd", "attention_lse_fwd", "attention_reference",
           "check_attention_inputs", "repeat_kv_heads"]

AttentionImpl = Literal["auto", "flash", "triton", "tiled", "sdpa", "reference"]
LseImpl = Literal["auto", "flash", "triton", "tiled", "cpu", "reference"]


def _auto(q: torch.Tensor, has_docs: bool, fused_fits: bool, flash_fits: bool, fused: str) -> tuple[str, str]:
    """The best exact path: `fused_fits` says torch's fused kernel takes this call, `flash_fits` flash-attn."""
    if q.is_cuda:
        if flash_fits and flash_attn_installed() and q.dtype in (torch.float16, torch.bfloat16):
            return "flash", "CUDA, flash-attn installed"
        why = "flash-attn is not installed" if not flash_attn_installed() else \
            "flash-attn does not take this call (dtype or document ids)"
        return ("triton", f"CUDA; {why}") if triton_runs(q) else ("tiled", f"CUDA without triton; {why}")
    if has_docs:
        return "tiled", f"{q.device.type} tensor with document ids: tiled online softmax, O(s) memory"
    if not fused_fits:
        return "tiled", f"{q.device.type} tensor, causal with {q.shape[1]} queries over other keys: tiled"
    return fused, f"{q.device.type} tensor without document ids: torch's fused kernel"


def _lse_impl(op: str, q: torch.Tensor, k: torch.Tensor, is_causal: bool, q_doc_ids: torch.Tensor | None,
              impl: str) -> str:
    has_docs = q_doc_ids is not None
    # torch's CPU kernel aligns causal to the top left; flash-attn (>= 2.1) to the bottom right, as we do
    fused_fits = not has_docs and not (is_causal and q.shape[1] != k.shape[1])
    impl = choose(op, impl, ("flash", "triton", "tiled", "cpu", "reference"), q,
                  lambda: _auto(q, has_docs, fused_fits, not has_docs, "cpu"))
    if (impl == "flash" and has_docs) or (impl == "cpu" and not fused_fits):
        raise ValueError(f"{op}: impl={impl!r} takes no document ids" + (
            "" if impl == "flash" else " and no causal mask over other keys") +
            "; use 'auto', 'triton', 'tiled' or 'reference'")
    return impl


def attention_lse_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, is_causal: bool, scale: float,
                      q_doc_ids: torch.Tensor | None = None, k_doc_ids: torch.Tensor | None = None,
                      impl: LseImpl = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """One ring block: q [b, s_q, h, d], k/v [b, s_k, h_kv, d] -> (out [b, s_q, h, d], lse [b, h, s_q] fp32).

    Causal is aligned to the bottom right (query i reads keys j <= i + s_k - s_q). `q_doc_ids`
    [b, s_q] and `k_doc_ids` [b, s_k] (int, given together) keep each query inside its document;
    a query left with no key gets out 0 and lse -inf. No gradient: see attention_lse_bwd.
    """
    check_attention_inputs("attention_lse_fwd", q, k, v, doc_ids=q_doc_ids, kv_doc_ids=k_doc_ids)
    impl = _lse_impl("attention_lse", q, k, is_causal, q_doc_ids, impl)
    return _run_lse_fwd(impl, q, k, v, is_causal=is_causal, scale=scale, q_doc_ids=q_doc_ids, k_doc_ids=k_doc_ids)


def attention_lse_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                      lse: torch.Tensor, *, is_causal: bool, scale: float, q_doc_ids: torch.Tensor | None = None,
                      k_doc_ids: torch.Tensor | None = None,
                      impl: LseImpl = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One ring block's (dq, dk, dv), fp32 and shaped like q, k, v, from the final (merged) out and lse."""
    check_attention_inputs("attention_lse_bwd", q, k, v, doc_ids=q_doc_ids, kv_doc_ids=k_doc_ids)
    impl = _lse_impl("attention_lse", q, k, is_causal, q_doc_ids, impl)
    return _run_lse_bwd(impl, dout, q, k, v, out, lse, is_causal=is_causal, scale=scale, q_doc_ids=q_doc_ids,
                        k_doc_ids=k_doc_ids)


def _run_lse_fwd(impl: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, is_causal: bool, scale: float,
                 q_doc_ids: torch.Tensor | None, k_doc_ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The chosen implementation's forward (flash and cpu take no document ids: the dispatch checked)."""
    if impl == "flash":
        from ithaca.kernels.attention.flash_cuda import attention_lse_fwd_flash  # optional GPU extra

        return attention_lse_fwd_flash(q, k, v, is_causal=is_causal, scale=scale)
    if impl == "cpu":
        from ithaca.kernels.attention.cpu_flash import attention_lse_fwd_cpu

        return attention_lse_fwd_cpu(q, k, v, is_causal=is_causal, scale=scale)
    if impl == "triton":
        from ithaca.kernels.attention.triton import attention_lse_fwd_triton as fwd  # triton is imported only when chosen
    else:
        fwd = attention_lse_fwd_tiled if impl == "tiled" else attention_lse_fwd_reference
    return fwd(q, k, v, is_causal=is_causal, scale=scale, q_doc_ids=q_doc_ids, k_doc_ids=k_doc_ids)


def _run_lse_bwd(impl: str, dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 out: torch.Tensor, lse: torch.Tensor, *, is_causal: bool, scale: float,
                 q_doc_ids: torch.Tensor | None,
                 k_doc_ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The chosen implementation's backward, as _run_lse_fwd."""
    if impl == "flash":
        from ithaca.kernels.attention.flash_cuda import attention_lse_bwd_flash

        return attention_lse_bwd_flash(dout, q, k, v, out, lse, is_causal=is_causal, scale=scale)
    if impl == "cpu":
        from ithaca.kernels.attention.cpu_flash import attention_lse_bwd_cpu

        return attention_lse_bwd_cpu(dout, q, k, v, out, lse, is_causal=is_causal, scale=scale)
    if impl == "triton":
        from ithaca.kernels.attention.triton import attention_lse_bwd_triton as bwd
    else:
        bwd = attention_lse_bwd_tiled if impl == "tiled" else attention_lse_bwd_reference
    return bwd(dout, q, k, v, out, lse, is_causal=is_causal, scale=scale, q_doc_ids=q_doc_ids, k_doc_ids=k_doc_ids)


class _Attention(torch.autograd.Function):
    """Whole attention through the ring step's pair (implementation `impl`, already chosen):
    forward keeps (out, lse), backward recomputes the scores tile by tile."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_doc_ids: torch.Tensor | None,
                k_doc_ids: torch.Tensor | None, is_causal: bool, scale: float, impl: str) -> torch.Tensor:
        out, lse = _run_lse_fwd(impl, q, k, v, is_causal=is_causal, scale=scale, q_doc_ids=q_doc_ids,
                                k_doc_ids=k_doc_ids)
        ctx.save_for_backward(q, k, v, out, lse, q_doc_ids, k_doc_ids)
        ctx.is_causal, ctx.scale, ctx.impl = is_causal, scale, impl
        return out

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        q, k, v, out, lse, q_doc_ids, k_doc_ids = ctx.saved_tensors
        dq, dk, dv = _run_lse_bwd(ctx.impl, dout, q, k, v, out, lse, is_causal=ctx.is_causal, scale=ctx.scale,
                                  q_doc_ids=q_doc_ids, k_doc_ids=k_doc_ids)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, is_causal: bool = True,
              doc_ids: torch.Tensor | None = None, kv_doc_ids: torch.Tensor | None = None,
              scale: float | None = None, impl: AttentionImpl = "auto") -> torch.Tensor:
    """Scaled dot-product attention over [b, s, h, d] tensors, differentiable; the math is in reference.py.

    q [b, s, h, d], k and v [b, s_k, h_kv, d] with h a multiple of h_kv (grouped-query attention).
    Causal is aligned to the bottom right. `doc_ids` [b, s] (int, below 2^31) marks packed documents: no
    query reads another document's keys; `kv_doc_ids` [b, s_k] gives the keys' documents when
    s_k != s (default: doc_ids). `scale` defaults to d^-0.5. Returns [b, s, h, d] in q's dtype.
    Raises ValueError on shapes that do not fit or an impl that cannot take the call.
    """
    check_attention_inputs("attention", q, k, v, doc_ids=doc_ids, kv_doc_ids=kv_doc_ids)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    k_doc_ids = doc_ids if kv_doc_ids is None else kv_doc_ids
    has_docs = doc_ids is not None
    fused_fits = not has_docs and not (is_causal and q.shape[1] != k.shape[1])
    flash_fits = kv_doc_ids is None and scale == q.shape[-1] ** -0.5  # our wrapper passes no scale or key ids
    impl = choose("attention", impl, ("flash", "triton", "tiled", "sdpa", "reference"), q,
                  lambda: _auto(q, has_docs, fused_fits, flash_fits, "sdpa"))
    if impl == "reference":
        return attention_reference(q, k, v, is_causal=is_causal, doc_ids=doc_ids, kv_doc_ids=kv_doc_ids, scale=scale)
    if impl == "sdpa":
        if not fused_fits:
            raise ValueError("attention: impl='sdpa' takes no document ids and no causal mask over other keys; "
                             "use 'auto', 'triton', 'tiled' or 'reference'")
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=is_causal, scale=scale, enable_gqa=q.shape[2] != k.shape[2])
        return out.transpose(1, 2)  # [b, h, s, d] -> [b, s, h, d]
    if impl == "flash":
        if not flash_fits:
            raise ValueError("attention: impl='flash' takes no kv_doc_ids and no scale; use 'auto' or 'triton'")
        from ithaca.kernels.attention.flash_cuda import flash_attention  # optional GPU extra

        return flash_attention(q, k, v, is_causal=is_causal, doc_ids=doc_ids)
    return _Attention.apply(q, k, v, doc_ids, k_doc_ids, is_causal, scale, impl)
