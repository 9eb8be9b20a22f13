"""Each parameter's full (unsharded) gradient norm under any layout, keyed by its single-process name.

What each rank holds before the update, and how the whole norm is made of it:
- no ZeRO: `param.grad`, already summed over dp x sp by DeepSpeed at the accumulation boundary;
- ZeRO 1-2: a flat partition per dp x sp rank, ZeRO-3: a partition per rank of its group;
  DeepSpeed's `safe_get_full_grad` assembles the whole gradient (a collective over that group);
- tp: megatron-core marks the split weights (`tensor_model_parallel`); a split weight's norm² is
  the sum over the tp ranks of its shards' norm², a replicated one (the norms' gains) is taken once;
- pp: each stage holds its own parts, under the pipeline's names (`canonical_name`); a tied
  embedding is on the first and last stage with the same gradient, taken once.
"""

from __future__ import annotations

import math
import re

import torch.distributed as dist
from deepspeed.utils import safe_get_full_grad
from torch import nn

from ithaca.models.state_layout import canonical_name
from ithaca.parallel.mesh import ParallelMesh


def full_grad_norms(module: nn.Module, mesh: ParallelMesh, n_layers: int) -> dict[str, float]:
    """{single-process name: whole gradient's L2 norm}, the same on every rank, in the single-
    process model's parameter order.

    Call between the last backward of a step and the update, on every rank (it communicates:
    ZeRO's gathers over each gradient's group, one all-gather of norms over the world). Parameters
    without a gradient are left out.
    """
    tp_rank = mesh.rank("tp")
    squares: dict[tuple[str, int], float] = {}  # (name, tp shard): norm²
    for name, param in module.named_parameters():
        grad = safe_get_full_grad(param)  # collective under ZeRO: every rank of the group calls it in this order
        if grad is None:
            continue
        shard = tp_rank if getattr(param, "tensor_model_parallel", False) else 0
        squares[(canonical_name(name, n_layers), shard)] = float(grad.double().pow(2).sum())
    every_rank: list[dict | None] = [None] * dist.get_world_size()
    dist.all_gather_object(every_rank, squares)
    whole: dict[tuple[str, int], float] = {}
    for held in every_rank:
        for key, square in held.items():
            whole.setdefault(key, square)  # dp/sp replicas (and a tied weight's second copy) hold the same gradient
    norms: dict[str, float] = {}
    for (name, _), square in sorted(whole.items(), key=lambda item: _model_order(item[0][0])):
        norms[name] = norms.get(name, 0.0) + square
    return {name: math.sqrt(square) for name, square in norms.items()}


def _model_order(name: str) -> tuple[int, int, str]:
    """Sort key: embedding, blocks in order, final norm, head (the single-process Llama's order)."""
    block = re.match(r"blocks\.(\d+)\.", name)
    if block:
        return (1, int(block[1]), "")
    return (0 if name.startswith("embed.") else 2 if name.startswith("norm.") else 3, 0, name)
