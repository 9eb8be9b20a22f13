"""Logits at a few positions only: the argmax of the next token where a label is kept.

The model's output head fuses the projection with the cross-entropy and never forms logits
(models/llama.py OutputLoss). Passkey scoring needs the argmax at the answer positions alone, so
a forward hook on each OutputLoss multiplies the hidden states there by the weight the head used
(this tp rank's vocabulary rows) and, under tp, reduces the max and then the first index holding
it over the vocabulary group: torch.argmax's answer on the whole vocabulary. The hook runs ahead
of any other forward hook, while ZeRO-3 still holds the gathered weight. Only ranks holding the
head (the last pipeline stage) record anything.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from ithaca.kernels.linear_cross_entropy.vocab_parallel import vocab_start
from ithaca.models.llama import OutputLoss


def answer_hits(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                group: dist.ProcessGroup | None) -> torch.Tensor:
    """hidden [b, s, dim], weight [V or V/tp, dim] (this rank's vocabulary rows), labels [b, s] ->
    [b] float64: per row, the labelled positions (labels >= 0) whose argmax over the whole
    vocabulary is the label. Collective over `group` (the tp ranks, which hold the same rows)."""
    kept = labels >= 0
    hits = torch.zeros(labels.shape[0], dtype=torch.float64, device=labels.device)
    if not kept.any():  # every tp rank holds the same labels, so all of them skip the collectives
        return hits
    logits = hidden[kept].float() @ weight.float().t()  # [n, V/tp]
    best, index = logits.max(dim=1)
    index = index + vocab_start(weight, group)
    if group is not None:
        top = best.clone()
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
        # the smallest vocabulary index holding the maximum, as torch.argmax picks among ties
        index = torch.where(best == top, index, torch.full_like(index, torch.iinfo(torch.int64).max))
        dist.all_reduce(index, op=dist.ReduceOp.MIN, group=group)
    rows = kept.nonzero()[:, 0]
    return hits.index_add_(0, rows, (index == labels[kept]).double())


@contextmanager
def recording_hits(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """While open, each forward of an OutputLoss inside `model` appends its `answer_hits` to the
    yielded list (one entry per micro-batch, in order; none on ranks without the head)."""
    recorded: list[torch.Tensor] = []

    def hook(head: OutputLoss, args: tuple, kwargs: dict, _output: torch.Tensor) -> None:
        hidden, labels = args[0], args[1]
        weight = kwargs.get("weight")
        recorded.append(answer_hits(hidden, head.weight if weight is None else weight, labels, head.vocab_group))

    handles = [m.register_forward_hook(hook, prepend=True, with_kwargs=True)
               for m in model.modules() if isinstance(m, OutputLoss)]
    try:
        yield recorded
    finally:
        for handle in handles:
            handle.remove()
