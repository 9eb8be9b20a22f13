"""Output projection and cross-entropy in plain PyTorch: the spec every fast path matches.

    logits = (hidden @ weight^T).float()       the matmul in the input dtype, as the model does it
    loss_i = logsumexp_j(logits_ij) - logits_i,label_i      0 where label_i == ignore_index

This form holds the whole [n, V] logits (and autograd keeps them for backward): the cost that
chunked.py and triton.py avoid. Under tensor parallelism (`group`) it all-gathers the vocabulary
shards and computes the same thing on every rank, so it stays the spec there too.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ithaca.kernels.linear_cross_entropy.vocab_parallel import gather_vocab


def linear_cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                   ignore_index: int = -100, *,
                                   group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """hidden [n, d], weight [V, d] (or this rank's shard [V/tp, d] with `group`), labels [n] int
    -> loss [n] fp32. Differentiable through plain autograd (and gather_vocab's backward)."""
    if group is not None:
        weight = gather_vocab(weight, group)  # [V/tp, d] -> [V, d]
    logits = (hidden @ weight.T).float()  # [n, V]
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none")
