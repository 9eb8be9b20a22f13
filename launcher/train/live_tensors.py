"""Live CPU tensor bytes, counted at the dispatcher: the CPU has no allocator statistics.

Every tensor an op returns adds its storage's bytes once (views share it) and a weakref on the
tensor takes them away when the last tensor on that storage dies (PyTorch keeps a tensor's Python
object alive while autograd or another tensor holds it, so saved activations stay counted). It
misses a kernel's private scratch space (e.g. inside one matmul), and what other threads allocate
(a mode is the thread's own: the data loader's threads and processes are outside it).
"""

from __future__ import annotations

import functools
import gc
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveTensorBytes(TorchDispatchMode):
    """While active (`with LiveTensorBytes() as counter:`, or between __enter__ and __exit__): `.live`
    CPU tensor bytes now, `.peak` since the start or the last `reset_peak()`."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self.storages: dict[int, list] = {}  # storage address -> [bytes, weak references to its live tensors]

    def reset_peak(self) -> None:
        self.peak = self.live

    def count_existing(self) -> None:
        """Add the CPU tensors that already exist as Python objects (weights, optimizer states), so
        that `.live` holds them too (one pass over the garbage collector's objects)."""
        for obj in gc.get_objects():
            if issubclass(type(obj), torch.Tensor):  # type(): isinstance would run proxies' __getattr__
                self._add(obj)

    def _add(self, t: torch.Tensor) -> None:
        if t.device.type != "cpu" or t.layout != torch.strided:
            return
        storage = t.untyped_storage()
        address = storage.data_ptr()
        if address == 0:  # an empty tensor
            return
        entry = self.storages.get(address)
        if entry is None:
            entry = self.storages[address] = [storage.nbytes(), []]
            self.live += entry[0]
            if self.live > self.peak:
                self.peak = self.live
        # the entry keeps the weak references alive; each one's callback runs when its tensor dies
        entry[1].append(weakref.ref(t, functools.partial(self._release, address)))

    def _release(self, address: int, ref: weakref.ref) -> None:
        entry = self.storages[address]
        entry[1].remove(ref)
        if not entry[1]:
            self.live -= entry[0]
            del self.storages[address]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._add(t)
        return out
