"""Output projection fused with cross-entropy: per-token losses without ever holding [n, V] logits.

Implementations; the math is in reference.py:
  triton     chunked.py's blocks with the softmax work fused in Triton kernels, matmuls by cuBLAS
             (triton.py); a CUDA tensor, or the CPU under TRITON_INTERPRET=1
  chunked    the same blocks in PyTorch (chunked.py): O(n + V) memory beyond inputs and gradients
  reference  whole fp32 logits and F.cross_entropy: the spec, O(n * V) memory
"auto" picks Triton on CUDA and the chunked form elsewhere; each call logs once which runs and why.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist

from ithaca.kernels._backend import auto_triton_or, choose
from ithaca.kernels.linear_cross_entropy.chunked import (TOKEN_CHUNK, TORCH_STEPS, VOCAB_CHUNK,
                                                         linear_cross_entropy_blocked)
from ithaca.kernels.linear_cross_entropy.reference import linear_cross_entropy_reference

__all__ = ["LinearCrossEntropyImpl", "linear_cross_entropy", "linear_cross_entropy_reference"]

LinearCrossEntropyImpl = Literal["auto", "triton", "chunked", "reference"]


def _check_inputs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int,
                  group: dist.ProcessGroup | None, token_chunk: int, vocab_chunk: int) -> None:
    """ValueError naming the argument for shapes, dtypes, chunk sizes and labels outside the vocabulary."""
    op = "linear_cross_entropy"
    if hidden.dim() != 2:
        raise ValueError(f"{op}: hidden must be [n, d]; got shape {tuple(hidden.shape)} (flatten [b, s, d] first)")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1] or weight.shape[0] == 0:
        raise ValueError(f"{op}: weight must be [V, d] with V > 0 and d = hidden's {hidden.shape[1]}; "
                         f"got shape {tuple(weight.shape)}")
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"{op}: labels must be [n] = [{hidden.shape[0]}] like hidden's rows; "
                         f"got {tuple(labels.shape)}")
    if hidden.dtype not in (torch.float32, torch.bfloat16) or weight.dtype != hidden.dtype:
        raise ValueError(f"{op}: hidden and weight must share one dtype, float32 or bfloat16; "
                         f"got hidden {hidden.dtype}, weight {weight.dtype}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"{op}: labels must be integer token ids; got {labels.dtype}")
    if token_chunk < 1 or vocab_chunk < 1:
        raise ValueError(f"{op}: token_chunk={token_chunk}, vocab_chunk={vocab_chunk}; both must be >= 1")
    vocab = weight.shape[0] * (1 if group is None else dist.get_world_size(group))  # global ids under tp
    if labels.numel():
        lo, hi = torch.where(labels == ignore_index, 0, labels).aminmax()  # one reduction for the whole check
        if lo.item() < 0 or hi.item() >= vocab:
            raise ValueError(f"{op}: labels hold ids in [{lo.item()}, {hi.item()}] that are not ignore_index="
                             f"{ignore_index}; each must be in [0, {vocab}) (the whole vocabulary)")


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                         *, group: dist.ProcessGroup | None = None, impl: LinearCrossEntropyImpl = "auto",
                         token_chunk: int = TOKEN_CHUNK, vocab_chunk: int = VOCAB_CHUNK) -> torch.Tensor:
    """Per-token cross-entropy of the logits hidden @ weight^T, differentiable w.r.t. hidden and weight.

    hidden [n, d] and weight [V, d], one dtype (float32 or bfloat16); labels [n] integer ids.
    The logits are computed in the input dtype, then taken to fp32 (reference.py). Returns loss
    [n] fp32, 0 where labels == ignore_index; any upstream gradient [n] works (per-token weights).
    `token_chunk` x `vocab_chunk` is the logits block the chunked and Triton paths hold at once
    (defaults 2048 x 4096: 2^23 elements, 32 MiB in fp32).

    Tensor parallelism: with `group` (tp ranks), `weight` is this rank's vocabulary shard, rows
    [rank * V/tp, (rank + 1) * V/tp) of the whole, equal in size on every rank; hidden, labels
    (global ids) and the upstream gradient are the same on every rank, and so is the loss.
    Communication: forward, one all-reduce MAX of [n] fp32 and one all-reduce SUM of [2, n] fp32;
    backward, one all-reduce SUM of dhidden [n, d] fp32; dweight stays this rank's shard.
    (impl "reference" all-gathers the weight instead.) None: the weight is the whole vocabulary.

    Raises ValueError on shapes or dtypes that do not fit, labels outside [0, V) (V = V/tp * tp
    with a group) that are not ignore_index, chunk sizes below 1, or an impl that cannot run here.
    """
    _check_inputs(hidden, weight, labels, ignore_index, group, token_chunk, vocab_chunk)
    impl = choose("linear_cross_entropy", impl, ("triton", "chunked", "reference"), hidden,
                  lambda: auto_triton_or("chunked", hidden))
    if impl == "reference":
        return linear_cross_entropy_reference(hidden, weight, labels, ignore_index, group=group)
    if impl == "triton":
        from ithaca.kernels.linear_cross_entropy.triton import TRITON_STEPS  # triton is imported only when chosen

        steps = TRITON_STEPS
    else:
        steps = TORCH_STEPS
    return linear_cross_entropy_blocked(hidden, weight, labels, ignore_index, group=group, steps=steps,
                                        token_chunk=token_chunk, vocab_chunk=vocab_chunk)
