"""Zigzag sequence layout for causal ring attention (DESIGN.md, "Ring attention").

The sequence is cut into 2P chunks; rank r holds chunks r and 2P-1-r, so under a causal mask
every rank has the same amount of work.
"""

from __future__ import annotations

import torch


def zigzag_split(x: torch.Tensor, rank: int, world: int, dim: int = 1) -> torch.Tensor:
    """This rank's part of a full sequence: chunks `rank` and `2*world-1-rank` of 2*world, concatenated.

    Raises ValueError if the length along `dim` is not divisible by 2*world.
    """
    if x.shape[dim] % (2 * world):
        raise ValueError(f"zigzag_split: length {x.shape[dim]} along dim {dim} must be divisible by "
                         f"2*world={2 * world}")
    chunks = x.chunk(2 * world, dim=dim)
    return torch.cat([chunks[rank], chunks[2 * world - 1 - rank]], dim=dim)


def zigzag_merge(parts: list[torch.Tensor], dim: int = 1) -> torch.Tensor:
    """The inverse of zigzag_split: every rank's part (in rank order) -> the full sequence."""
    world = len(parts)
    halves = [part.chunk(2, dim=dim) for part in parts]
    ordered = [halves[i][0] for i in range(world)] + [halves[world - 1 - i][1] for i in range(world)]
    return torch.cat(ordered, dim=dim)
