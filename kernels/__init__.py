"""Fused kernels: one folder per op holding a plain-PyTorch reference (the spec), a Triton kernel
(forward and backward) and one dispatch, `<op>(..., impl="auto")`, that picks between them.
`delta_rule` has a chunked PyTorch form besides: "auto" picks its Triton kernels (forward and
backward, keys up to d_k=256, chunks of 32 tokens on a GPU) on CUDA and the chunked form
elsewhere or for wider keys; those kernels have never run on a GPU (tested under
TRITON_INTERPRET=1 and compiled for sm_90 only; issue #15)."""

from ithaca.kernels.attention import attention, attention_lse_bwd, attention_lse_fwd
from ithaca.kernels.delta_rule import delta_rule
from ithaca.kernels.linear_attention import linear_attention
from ithaca.kernels.linear_cross_entropy import linear_cross_entropy
from ithaca.kernels.rms_norm import rms_norm
from ithaca.kernels.rope import rope
from ithaca.kernels.swiglu import swiglu

__all__ = ["attention", "attention_lse_bwd", "attention_lse_fwd", "delta_rule", "linear_attention",
           "linear_cross_entropy", "rms_norm", "rope", "swiglu"]
