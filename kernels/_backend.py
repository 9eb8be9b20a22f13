"""Which fast paths this process can use; each fallback is logged once with its reason."""

from __future__ import annotations

import importlib.util

import torch

from ithaca.log import get_logger, warn_once

log = get_logger(__name__)


def flash_attn_usable(x: torch.Tensor) -> bool:
    """flash-attn runs CUDA fp16/bf16 tensors when the `gpu` extra is installed."""
    if not x.is_cuda:
        return False
    if importlib.util.find_spec("flash_attn") is None:
        warn_once(log, "flash-attn is not installed (pip install 'ithaca[gpu]'); using torch SDPA")
        return False
    if x.dtype not in (torch.float16, torch.bfloat16):
        warn_once(log, f"flash-attn needs fp16/bf16, got {x.dtype}; using torch SDPA")
        return False
    return True
