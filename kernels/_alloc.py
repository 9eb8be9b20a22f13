"""Output buffers for kernels: NaN-filled when ITHACA_POISON=1 (tests), so an element a kernel
forgets to write fails the comparison instead of passing on leftover memory."""

from __future__ import annotations

import os

import torch


def new_output(shape: tuple[int, ...] | torch.Size, like: torch.Tensor,
               dtype: torch.dtype | None = None) -> torch.Tensor:
    """An uninitialised tensor on `like`'s device (dtype defaults to `like`'s); every element must be written."""
    dtype = dtype or like.dtype
    if os.environ.get("ITHACA_POISON") == "1":
        fill = float("nan") if dtype.is_floating_point else -1
        return torch.full(shape, fill, dtype=dtype, device=like.device)
    return torch.empty(shape, dtype=dtype, device=like.device)
