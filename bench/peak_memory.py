"""Peak memory of a call, measured: CUDA allocator stats on a GPU, live tensor bytes on the CPU.

The CPU has no allocator statistics, so `peak_bytes` counts at the dispatcher: every tensor an op
returns adds its storage's bytes once (views share it) and a weakref on the tensor takes them
away when the last tensor on that storage dies (PyTorch keeps a tensor's Python object alive
while autograd or another tensor holds it, so saved activations stay counted). It misses a
kernel's private scratch space (e.g. inside one matmul), which is small beside the tensors
these benchmarks compare.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, Callable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class _LiveTensorBytes(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self.storages: dict[int, list[int]] = {}  # storage address -> [bytes, live tensors on it]

    def reset_peak(self) -> None:
        self.peak = self.live

    def _release(self, address: int) -> None:
        entry = self.storages[address]
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self.storages[address]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                continue
            storage = t.untyped_storage()
            address = storage.data_ptr()
            if address == 0:  # an empty tensor
                continue
            if address not in self.storages:
                self.storages[address] = [storage.nbytes(), 0]
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
            self.storages[address][1] += 1
            weakref.finalize(t, self._release, address)
        return out


@contextlib.contextmanager
def live_tensor_bytes() -> Iterator[_LiveTensorBytes]:
    """Count live CPU tensor bytes while the block runs: `.live` now, `.peak` since the start or the
    last `reset_peak()`."""
    with _LiveTensorBytes() as counter:
        yield counter


def peak_bytes(fn: Callable[[], Any], device: str) -> int:
    """Peak bytes allocated while fn() runs, beyond what was allocated before it."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with _LiveTensorBytes() as counter:
        fn()
    return counter.peak
