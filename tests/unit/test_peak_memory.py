"""bench/peak_memory.py counts live tensor bytes on the CPU correctly: the benchmarks' memory figures rest on it."""

from __future__ import annotations

import torch

from ithaca.bench.peak_memory import peak_bytes

MB = 1_000_000


def test_peak_counts_live_tensors_once_and_forgets_freed_ones():
    x = torch.randn(1000, 250)  # 1 MB of inputs: not counted

    def step() -> None:
        a = x * 2             # +1 MB
        view = a[:, :10]      # a view: shares a's storage, +0
        b = a + 1             # +1 MB: peak 2 MB
        del a, view, b        # all freed
        c = torch.empty(3 * MB // 4, dtype=torch.uint8)  # +0.75 MB, after the frees
        del c

    assert peak_bytes(step, "cpu") == 2 * MB


def test_tensors_saved_for_backward_stay_counted():
    w = torch.randn(500, 500, requires_grad=True)  # 1 MB

    def step() -> None:
        h = (w * 2).exp()     # w * 2: +1 MB, freed once exp has run; exp's output (+1 MB) is saved by exp
        h.sum().backward()    # + exp's input gradient (1 MB), then w.grad (1 MB) once that one is freed

    # 3 MB (+ a scalar): exp's saved output and the two gradients; it would read 2 MB if the
    # tensor autograd holds were forgotten when Python dropped `h`
    assert 3 * MB <= peak_bytes(step, "cpu") < 3 * MB + 100
