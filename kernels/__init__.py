"""Fused kernels: one folder per op holding a plain-PyTorch reference (the spec), a Triton kernel
(forward and backward) and one dispatch, `<op>(..., impl="auto")`, that picks between them."""

from ithaca.kernels.attention import attention, attention_lse_bwd, attention_lse_fwd

__all__ = ["attention", "attention_lse_bwd", "attention_lse_fwd"]
