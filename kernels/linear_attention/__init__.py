"""Linear attention with decay (plain, retention/lightning, gated): the recurrence and chunked forms.

Only the plain-PyTorch reference exists yet; it is what LASP-2 (ithaca.parallel.lasp2_attention)
composes, and what a fused kernel will be tested against.
"""

from ithaca.kernels.linear_attention.reference import (chunk_memory, chunk_terms, expand_log_decay,
                                                        linear_attention_chunked, linear_attention_recurrent,
                                                        state_reach)

__all__ = ["chunk_memory", "chunk_terms", "expand_log_decay", "linear_attention_chunked",
           "linear_attention_recurrent", "state_reach"]
