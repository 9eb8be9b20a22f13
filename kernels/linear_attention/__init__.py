"""Linear attention with decay (plain, retention/lightning, gated) over packed documents: one dispatch.

Implementations; the math is in reference.py (the recurrence) and chunked.py (the chunked form):
  triton     ours (triton.py): a CUDA tensor, or the CPU under TRITON_INTERPRET=1
  chunked    PyTorch, chunk by chunk (chunked.py, chunks of CHUNK tokens): any device
  reference  the token recurrence (reference.py): the spec, s sequential steps
"auto" picks Triton on CUDA and chunked elsewhere; each call logs once which runs and why.
LASP-2 (ithaca.parallel.lasp2_attention) runs `linear_attention` on its own tokens and joins the
ranks with two public pieces of the chunked form: `chunk_memory` and `state_reach`.
"""

from __future__ import annotations

from typing import Literal

import torch

from ithaca.kernels._backend import auto_triton_or, choose
from ithaca.kernels.linear_attention.chunked import chunk_memory, linear_attention_chunked, state_reach
from ithaca.kernels.linear_attention.reference import expand_log_decay, linear_attention_reference

__all__ = ["LinearAttentionImpl", "check_linear_attention_inputs", "chunk_memory", "expand_log_decay",
           "linear_attention", "state_reach"]

LinearAttentionImpl = Literal["auto", "triton", "chunked", "reference"]

CHUNK = 64
"""Chunk length of the chunked path: its within-chunk scores cost O(CHUNK^2) memory per head."""


def check_linear_attention_inputs(op: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                  log_decay: torch.Tensor | None = None, resets: torch.Tensor | None = None,
                                  initial_state: torch.Tensor | None = None) -> None:
    """Raise ValueError, naming `op` and the argument, unless q, k [b, s, h, d_k] and v [b, s, h, d_v]
    share one floating dtype, log_decay is None, [h] or [b, s, h], resets is None or [b, s] bool,
    and initial_state is None or [b, h, d_k, d_v]. Values are not checked (log_decay <= 0 would
    need a device sync)."""
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"{op}: want q = k [b, s, h, d_k], v [b, s, h, d_v]; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not q.dtype.is_floating_point or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"{op}: q, k, v must share one floating dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    b, s, h, d_k = q.shape
    if log_decay is not None and tuple(log_decay.shape) not in ((h,), (b, s, h)):
        raise ValueError(f"{op}: log_decay must be [h]={(h,)} or [b, s, h]={(b, s, h)}; got {tuple(log_decay.shape)}")
    if resets is not None and (tuple(resets.shape) != (b, s) or resets.dtype != torch.bool):
        raise ValueError(f"{op}: resets must be [b, s]={(b, s)} bool; got {tuple(resets.shape)} {resets.dtype}")
    if initial_state is not None and tuple(initial_state.shape) != (b, h, d_k, v.shape[-1]):
        raise ValueError(f"{op}: initial_state must be [b, h, d_k, d_v]={(b, h, d_k, v.shape[-1])}; "
                         f"got {tuple(initial_state.shape)}")


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor | None = None, *,
                     scale: float, initial_state: torch.Tensor | None = None, resets: torch.Tensor | None = None,
                     impl: LinearAttentionImpl = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Causal linear attention with decay: S_i = exp(log_decay_i) S_{i-1} + k_i^T v_i, o_i = (scale q_i) S_i.

    q, k [b, s, h, d_k] and v [b, s, h, d_v], one floating dtype. `log_decay` (<= 0, not checked)
    is None (plain), [h] (a fixed per-head decay: retention / lightning attention) or [b, s, h]
    (per-token gates). `initial_state` [b, h, d_k, d_v] (any float dtype) or None (zeros).
    `resets` [b, s] bool marks tokens that start a document: the state before them is dropped.
    Returns (out [b, s, h, d_v] in q's dtype, final state [b, h, d_k, d_v] fp32), both
    differentiable: gradients reach q, k, v, initial_state and log_decay (both forms), and the
    final state may carry a gradient of its own. Raises ValueError on shapes that do not fit, an
    unknown impl, or impl="triton" where Triton cannot run.
    """
    check_linear_attention_inputs("linear_attention", q, k, v, log_decay, resets, initial_state)
    impl = choose("linear_attention", impl, ("triton", "chunked", "reference"), q,
                  lambda: auto_triton_or("chunked", q))
    if impl == "reference":
        return linear_attention_reference(q, k, v, log_decay, scale=scale, initial_state=initial_state, resets=resets)
    if impl == "chunked":
        return linear_attention_chunked(q, k, v, log_decay, scale=scale, chunk_size=CHUNK,
                                        initial_state=initial_state, resets=resets)
    from ithaca.kernels.linear_attention.triton import linear_attention_triton  # triton is imported only when chosen

    return linear_attention_triton(q, k, v, log_decay, scale=scale, initial_state=initial_state, resets=resets)
