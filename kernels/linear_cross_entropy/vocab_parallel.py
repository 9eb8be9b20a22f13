"""Vocabulary-parallel pieces: each of the tp ranks of `group` holds rows
[rank * V/tp, (rank + 1) * V/tp) of the output weight, and the head's input is replicated.

The per-token statistics over a shard combine exactly (the log-sum-exp merge of DESIGN.md,
"Ring attention", over P parts at once):

    M = max_r m_r      S = sum_r s_r * exp(m_r - M)      lse = M + log S      target = sum_r t_r

where rank r has the max m_r, the sum s_r of exp(logit - m_r) over its columns and t_r, the
target logit if the label is one of its columns and 0 otherwise (exactly one rank holds it).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def vocab_start(weight: torch.Tensor, group: dist.ProcessGroup | None) -> int:
    """The global id of this rank's first vocabulary row (0 without tensor parallelism)."""
    return 0 if group is None else dist.get_rank(group) * weight.shape[0]


def combine_stats(row_max: torch.Tensor, row_sum: torch.Tensor, target: torch.Tensor,
                  group: dist.ProcessGroup) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-shard (max, sum-exp, target logit), each [n] fp32 -> global (lse, target logit), [n] fp32.

    Communication, once for all n tokens of the call: an all-reduce (MAX) of [n] fp32, then an
    all-reduce (SUM) of [2, n] fp32 (the rescaled sums and the target logits travel together).
    """
    global_max = row_max.clone()
    dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
    sums = torch.stack([row_sum * torch.exp(row_max - global_max), target])  # [2, n]
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    return global_max + torch.log(sums[0]), sums[1]


class _GatherVocab(torch.autograd.Function):
    """The whole weight from its vocabulary shards (the reference's way to stay the spec under tp).
    forward:  all-gather  [V/tp, d] -> [V, d]     each rank sends its shard
    backward: none        dW [V, d] -> this rank's rows [V/tp, d]: every rank computed the same
              loss from the same replicated hidden, labels and upstream gradient, so every rank
              holds the same dW and keeps its own rows
    """

    @staticmethod
    def forward(ctx, shard: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        world, rows = dist.get_world_size(group), shard.shape[0]
        ctx.rows = slice(dist.get_rank(group) * rows, (dist.get_rank(group) + 1) * rows)
        whole = shard.new_empty(world * shard.numel())  # flat: gloo takes a flat gather output
        dist.all_gather_single(whole, shard.reshape(-1).contiguous(), group=group)
        return whole.view(world * rows, *shard.shape[1:])

    @staticmethod
    def backward(ctx, d_whole: torch.Tensor) -> tuple[torch.Tensor, None]:
        return d_whole[ctx.rows], None


def gather_vocab(shard: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Differentiable all-gather of vocabulary shards: [V/tp, d] on each rank -> [V, d] on every rank."""
    return _GatherVocab.apply(shard, group)
