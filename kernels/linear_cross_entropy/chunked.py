"""Output projection and cross-entropy block by block, never holding [n, V] logits
(Cut Cross-Entropy's plan, arXiv:2411.09009, with torch matmuls for the blocks).

The math is reference.py's. Tokens are cut into chunks of `token_chunk` rows and the vocabulary
into chunks of `vocab_chunk` rows of the weight; one (token chunk x vocab chunk) block of logits
exists at a time.

    forward   per block: logits = h_t @ W_v^T (input dtype), folded into each row's running
              (max m, sum-exp s) and, where the label falls in the block, its target logit;
              lse = m + log s, loss = lse - target. Saved: hidden, weight, labels, lse [n].
    backward  ONE pass over the blocks, each recomputed once:
              dlogits = g_i * (exp(logits - lse_i) - onehot(label_i))   (g: the upstream gradient)
              dhidden_t += dlogits @ W_v      dweight_v += dlogits^T @ h_t      (fp32 accumulators)

Beyond the inputs and the gradients, memory is one block (TOKEN_CHUNK * VOCAB_CHUNK elements,
a few fp32 copies of it in the PyTorch steps) plus O(n) statistics; the fp32 accumulators are
gradient-sized and cast to the input dtypes at the end.

The per-block work ("steps") is swappable: TORCH_STEPS here (impl "chunked"), triton.py's fused
kernels (impl "triton"); the loop and the autograd.Function are this file's, shared by both.
Under tensor parallelism (`group`, vocab_parallel.py) the weight is this rank's vocabulary shard:
forward combines the shards' statistics with two all-reduces for all n tokens at once, backward
uses the global lse and all-reduces dhidden (SUM, fp32) once at the end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from ithaca.kernels.linear_cross_entropy.vocab_parallel import combine_stats, vocab_start

TOKEN_CHUNK = 2048
"""Tokens per block. With VOCAB_CHUNK, one block is 2^23 logits: 32 MiB in fp32."""
VOCAB_CHUNK = 4096
"""Vocabulary rows per block; large enough that each block's matmuls keep cuBLAS busy."""


@dataclass(frozen=True)
class BlockSteps:
    """The work on one logits block [t, v] (input dtype, freshly made by the loop, so it may be
    overwritten); `col0` is the global vocabulary id of its first column, `labels` [t] global ids.

    fold(logits, labels, col0, row_max, row_sum, target): fold the block into the rows' running
        max and sum of exp(logit - max), and add the target logit to `target` where the label is
        in the block; all three [t] fp32, updated in place.
    dlogits(logits, labels, col0, lse, grad) -> g * (exp(logits - lse) - onehot) in logits' dtype,
        with lse and grad [t] fp32.
    """

    fold: Callable[[torch.Tensor, torch.Tensor, int, torch.Tensor, torch.Tensor, torch.Tensor], None]
    dlogits: Callable[[torch.Tensor, torch.Tensor, int, torch.Tensor, torch.Tensor], torch.Tensor]


def _label_columns(labels: torch.Tensor, col0: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each label's column in a block of `width` columns from `col0` (clamped in range) and whether it is there."""
    col = labels - col0
    return col.clamp(0, width - 1), (col >= 0) & (col < width)


def _fold_torch(logits: torch.Tensor, labels: torch.Tensor, col0: int, row_max: torch.Tensor,
                row_sum: torch.Tensor, target: torch.Tensor) -> None:
    x = logits.float()  # [t, v]; the same tensor when fp32: overwritten below
    col, hit = _label_columns(labels, col0, x.shape[1])
    target.add_(torch.where(hit, x.gather(1, col[:, None])[:, 0], 0.0))  # before x is overwritten
    new_max = torch.maximum(row_max, x.amax(1))
    # online softmax: rescale the old sum to the new max (row_max starts at -inf: the factor is 0)
    row_sum.mul_(torch.exp(row_max - new_max)).add_(x.sub_(new_max[:, None]).exp_().sum(1))
    row_max.copy_(new_max)


def _dlogits_torch(logits: torch.Tensor, labels: torch.Tensor, col0: int, lse: torch.Tensor,
                   grad: torch.Tensor) -> torch.Tensor:
    probs = logits.float().sub_(lse[:, None]).exp_()  # [t, v] softmax over the whole vocabulary
    col, hit = _label_columns(labels, col0, probs.shape[1])
    probs.scatter_add_(1, col[:, None], -hit[:, None].float())  # - onehot, without a host sync
    return probs.mul_(grad[:, None]).to(logits.dtype)


TORCH_STEPS = BlockSteps(fold=_fold_torch, dlogits=_dlogits_torch)


def _spans(n: int, chunk: int) -> list[tuple[int, int]]:
    return [(start, min(start + chunk, n)) for start in range(0, n, chunk)]


def _add_matmul(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b. bf16 operands: the product is rounded to bf16 once per block before
    the fp32 sum (torch has no bf16 x bf16 -> fp32 matmul on the CPU)."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    else:
        acc.add_(a @ b)


def _forward_stats(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, col0: int, steps: BlockSteps,
                   token_chunk: int, vocab_chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per token over this weight's rows: (max, sum of exp(logit - max), target logit or 0), [n] fp32 each."""
    n = hidden.shape[0]
    row_max = hidden.new_full((n,), float("-inf"), dtype=torch.float32)
    row_sum = hidden.new_zeros(n, dtype=torch.float32)
    target = hidden.new_zeros(n, dtype=torch.float32)
    for t0, t1 in _spans(n, token_chunk):
        for v0, v1 in _spans(weight.shape[0], vocab_chunk):
            logits = hidden[t0:t1] @ weight[v0:v1].T  # [t, v] in the input dtype, as the reference
            steps.fold(logits, labels[t0:t1], col0 + v0, row_max[t0:t1], row_sum[t0:t1], target[t0:t1])
    return row_max, row_sum, target


def _backward_grads(grad: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                    lse: torch.Tensor, col0: int, steps: BlockSteps, token_chunk: int,
                    vocab_chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(dhidden [n, d], dweight [V, d]), fp32, in one pass over the blocks; grad [n] fp32 (0 where ignored)."""
    dhidden = torch.zeros_like(hidden, dtype=torch.float32)
    dweight = torch.zeros_like(weight, dtype=torch.float32)
    for t0, t1 in _spans(hidden.shape[0], token_chunk):
        h = hidden[t0:t1]
        for v0, v1 in _spans(weight.shape[0], vocab_chunk):
            w = weight[v0:v1]
            dlogits = steps.dlogits(h @ w.T, labels[t0:t1], col0 + v0, lse[t0:t1], grad[t0:t1])  # [t, v]
            _add_matmul(dhidden[t0:t1], dlogits, w)
            _add_matmul(dweight[v0:v1], dlogits.T, h)
    return dhidden, dweight


class _LinearCrossEntropy(torch.autograd.Function):
    """loss [n] fp32 from hidden [n, d], weight [V or V/tp, d], labels [n]; see the module docstring."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int,
                group: dist.ProcessGroup | None, steps: BlockSteps, token_chunk: int,
                vocab_chunk: int) -> torch.Tensor:
        col0 = vocab_start(weight, group)
        row_max, row_sum, target = _forward_stats(hidden, weight, labels, col0, steps, token_chunk, vocab_chunk)
        if group is None:
            lse = row_max + torch.log(row_sum)
        else:
            lse, target = combine_stats(row_max, row_sum, target, group)  # two all-reduces of O(n)
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.ignore_index, ctx.group, ctx.steps = ignore_index, group, steps
        ctx.token_chunk, ctx.vocab_chunk = token_chunk, vocab_chunk
        return torch.where(labels == ignore_index, 0.0, lse - target)

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        hidden, weight, labels, lse = ctx.saved_tensors
        grad = torch.where(labels == ctx.ignore_index, 0.0, grad_loss.float())  # ignored tokens have no loss
        dhidden, dweight = _backward_grads(grad, hidden, weight, labels, lse, vocab_start(weight, ctx.group),
                                           ctx.steps, ctx.token_chunk, ctx.vocab_chunk)
        if ctx.group is not None:
            # the replicated input fed every shard: its gradient is the sum of the shards' parts
            dist.all_reduce(dhidden, op=dist.ReduceOp.SUM, group=ctx.group)
        return dhidden.to(hidden.dtype), dweight.to(weight.dtype), None, None, None, None, None, None


def linear_cross_entropy_blocked(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                 ignore_index: int, *, group: dist.ProcessGroup | None, steps: BlockSteps,
                                 token_chunk: int = TOKEN_CHUNK, vocab_chunk: int = VOCAB_CHUNK) -> torch.Tensor:
    """The blocked loss with `steps` doing each block's work -> loss [n] fp32; inputs checked by the caller."""
    return _LinearCrossEntropy.apply(hidden, weight, labels, ignore_index, group, steps, token_chunk, vocab_chunk)
