"""The gated delta rule (DeltaNet, Gated DeltaNet) over packed documents: one dispatch for the
outputs (`delta_rule`) and one for the affine map a run of tokens applies to the state
(`delta_rule_transition`), which sequence parallelism composes across ranks (issue #15).

Implementations; the math is in reference.py (the recurrence) and chunked.py (the chunked form):
  triton     ours (triton.py), forward and backward: a CUDA tensor, or the CPU under
             TRITON_INTERPRET=1; keys up to MAX_DK=256 wide
  chunked    PyTorch, chunk by chunk (chunked.py, chunks of CHUNK tokens): any device
  reference  the token recurrence (reference.py): the spec, s sequential steps
"auto" picks Triton on CUDA (chunked when d_k > MAX_DK) and chunked elsewhere; each call logs once
which runs and why.
"""

from __future__ import annotations

from typing import Literal

import torch

from ithaca.kernels._backend import auto_triton_or, choose
from ithaca.kernels.delta_rule.chunked import delta_rule_chunked, delta_rule_transition_chunked
from ithaca.kernels.delta_rule.limits import MAX_DK
from ithaca.kernels.delta_rule.reference import delta_rule_reference, delta_rule_transition_reference
from ithaca.kernels.linear_attention import check_linear_attention_inputs

__all__ = ["DeltaRuleImpl", "delta_rule", "delta_rule_transition"]

DeltaRuleImpl = Literal["auto", "triton", "chunked", "reference"]

CHUNK = 64
"""Chunk length of the chunked path: O(CHUNK^2) memory per head, CHUNK sequential substitution rows."""



def _check_inputs(op: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                  log_decay: torch.Tensor | None, resets: torch.Tensor | None,
                  initial_state: torch.Tensor | None) -> None:
    check_linear_attention_inputs(op, q, k, v, log_decay, resets, initial_state)
    if tuple(beta.shape) != tuple(q.shape[:3]) or not beta.dtype.is_floating_point:
        raise ValueError(f"{op}: beta must be [b, s, h]={tuple(q.shape[:3])} floating; "
                         f"got {tuple(beta.shape)} {beta.dtype}")


def _auto(x: torch.Tensor) -> tuple[str, str]:
    if x.is_cuda and x.shape[-1] > MAX_DK:
        return "chunked", f"d_k={x.shape[-1]} > {MAX_DK}: the Triton kernels hold a key in one block"
    return auto_triton_or("chunked", x)


def _choose(op: str, impl: str, x: torch.Tensor) -> str:
    return choose(op, impl, ("triton", "chunked", "reference"), x, lambda: _auto(x))


def delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, *,
               log_decay: torch.Tensor | None = None, scale: float | None = None,
               resets: torch.Tensor | None = None, initial_state: torch.Tensor | None = None,
               output_final_state: bool = False,
               impl: DeltaRuleImpl = "auto") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated delta rule: per token S <- exp(log_decay) S; u = beta (v - S^T k); S <- S + k u^T; o = S^T (scale q).

    q, k [b, s, h, d_k] and v [b, s, h, d_v], one floating dtype; keys are expected L2-normalised
    and beta in (0, 1) (the recurrence is stable then; not checked). beta [b, s, h] float.
    `log_decay` (<= 0, not checked) is None (DeltaNet), [h] or [b, s, h] (Gated DeltaNet's gates).
    `scale` None means d_k ** -0.5. `resets` [b, s] bool marks tokens that start a document: the
    state before them is dropped. `initial_state` [b, h, d_k, d_v] (any float dtype) or None (zeros).
    Returns (out [b, s, h, d_v] in q's dtype, final state [b, h, d_k, d_v] fp32 if
    output_final_state else None); gradients reach q, k, v, beta, log_decay and initial_state
    (autograd through the PyTorch paths, triton.py's backward kernels for "triton"). Raises
    ValueError on shapes that do not fit, an unknown impl, or impl="triton" where Triton cannot run
    or d_k > MAX_DK.
    """
    _check_inputs("delta_rule", q, k, v, beta, log_decay, resets, initial_state)
    impl = _choose("delta_rule", impl, q)
    kwargs = dict(log_decay=log_decay, scale=scale, resets=resets, initial_state=initial_state,
                  output_final_state=output_final_state)
    if impl == "reference":
        return delta_rule_reference(q, k, v, beta, **kwargs)
    if impl == "chunked":
        return delta_rule_chunked(q, k, v, beta, chunk_size=CHUNK, **kwargs)
    from ithaca.kernels.delta_rule.triton import delta_rule_triton  # triton is imported only when chosen

    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out, final = delta_rule_triton(q, k, v, beta, log_decay=log_decay, scale=scale, resets=resets,
                                   initial_state=initial_state)
    return out, final if output_final_state else None


def delta_rule_transition(k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, *,
                          log_decay: torch.Tensor | None = None, resets: torch.Tensor | None = None,
                          impl: DeltaRuleImpl = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """The affine map S_out = A S_in + B that tokens k, v, beta (as in delta_rule) apply to the state
    they receive: (A [b, h, d_k, d_k], B [b, h, d_k, d_v]) fp32, differentiable. B is the final state
    from a zero start; A is exactly zero when a document starts among the tokens. Consecutive runs
    compose as (A2 A1, A2 B1 + B2): chunked.py's docstring derives it. Raises ValueError as delta_rule.
    """
    _check_inputs("delta_rule_transition", k, k, v, beta, log_decay, resets, None)
    impl = _choose("delta_rule_transition", impl, k)
    if impl == "reference":
        return delta_rule_transition_reference(k, v, beta, log_decay=log_decay, resets=resets)
    if impl == "chunked":
        return delta_rule_transition_chunked(k, v, beta, log_decay=log_decay, resets=resets, chunk_size=CHUNK)
    from ithaca.kernels.delta_rule.triton import delta_rule_transition_triton

    return delta_rule_transition_triton(k, v, beta, log_decay=log_decay, resets=resets)
