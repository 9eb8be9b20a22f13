"""Peak memory of a call, measured: CUDA allocator stats on a GPU, live tensor bytes on the CPU.

The CPU has no allocator statistics, so `peak_bytes` counts at the dispatcher
(launcher/train/live_tensors.py, the counter the training step line uses on the CPU too): every
tensor an op returns adds its storage's bytes once, and they go when the last tensor on that storage
dies. It misses a kernel's private scratch space (e.g. inside one matmul), which is small beside the
tensors these benchmarks compare.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ithaca.launcher.train.live_tensors import LiveTensorBytes


def peak_bytes(fn: Callable[[], Any], device: str) -> int:
    """Peak bytes allocated while fn() runs, beyond what was allocated before it."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with LiveTensorBytes() as counter:
        fn()
    return counter.peak
