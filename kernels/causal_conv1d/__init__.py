"""The short causal depthwise convolution of Gated DeltaNet's q/k/v inputs, document-aware.

    out[t] = bias + sum_{d<K} weight[:, K-1-d] * x[t-d],   x[t-d] = 0 outside t's document

PyTorch only, one implementation on every device: K (4 typically) elementwise multiply-adds over
[b, s, c], memory-bound, with no reduction for a kernel to fuse. Its cost is memory: autograd keeps
one masked copy of x per tap for the weight's gradient, K * b * s * c elements per layer, unless
the layer's interior is recomputed (`activation_checkpointing: selective`). Sequence parallelism
(ithaca.parallel.sequence_parallel_causal_conv1d) calls this on each piece with the K-1 tokens
before it (`prefix`) received from the rank that holds them.
"""

from __future__ import annotations

import torch

__all__ = ["causal_conv1d"]


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, *, resets: torch.Tensor | None = None,
                  bias: torch.Tensor | None = None, prefix: torch.Tensor | None = None,
                  prefix_resets: torch.Tensor | None = None) -> torch.Tensor:
    """The causal depthwise convolution of x [..., L, c] with weight [c, K] (torch's depthwise
    conv1d weight squeezed; the last tap weighs the current token) and bias [c].

    resets [..., L] bool marks each document's first token: no window reaches across one.
    prefix [..., K-1, c] holds the K-1 tokens before x (None: x starts the sequence, zeros before
    it) and prefix_resets [..., K-1] their flags. Returns [..., L, c]; gradients reach x, weight,
    bias and prefix. Raises ValueError on shapes that do not fit.
    """
    *lead, length, c = x.shape
    if weight.dim() != 2 or weight.shape[0] != c:
        raise ValueError(f"causal_conv1d: weight {tuple(weight.shape)} must be [c={c}, K]")
    kernel = weight.shape[1]
    halo = kernel - 1
    if prefix is None:
        prefix = x.new_zeros(*lead, halo, c)
    if tuple(prefix.shape) != (*lead, halo, c):
        raise ValueError(f"causal_conv1d: prefix {tuple(prefix.shape)} must be {(*lead, halo, c)} (K-1 tokens)")
    if resets is not None and tuple(resets.shape) != (*lead, length):
        raise ValueError(f"causal_conv1d: resets {tuple(resets.shape)} must be {(*lead, length)}")
    ext = torch.cat([prefix, x], dim=-2)  # [..., K-1+L, c]
    if resets is not None:
        flags = torch.zeros(*lead, halo, device=x.device) if prefix_resets is None else prefix_resets.float()
        starts = torch.cat([flags, resets.float()], dim=-1).cumsum(dim=-1)  # documents begun so far
    out = torch.zeros_like(x)
    for d in range(kernel):
        tap = ext[..., halo - d: halo - d + length, :]  # x[t-d] for every t
        if resets is not None and d:
            # x[t-d] is in t's document iff no document starts at t-d+1 .. t
            tap = tap * (starts[..., halo:] == starts[..., halo - d: halo - d + length]).unsqueeze(-1)
        out = out + tap * weight[:, kernel - 1 - d]
    return out if bias is None else out + bias
