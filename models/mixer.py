"""The seam between token mixers and parallelism: what a mixer is given, and the attention it calls.

A model is built with local (single-device) attention. `ithaca.parallel.parallelize` later swaps
each mixer's `attend` for a sequence-parallel one bound to the mesh; anything that meets the
Protocols below fits, so a library user can plug in their own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch
from torch.utils.checkpoint import checkpoint

from ithaca.data.batch import Batch
from ithaca.kernels import attention, delta_rule, linear_attention
from ithaca.kernels.causal_conv1d import causal_conv1d
from ithaca.models.llama_args import KernelChoice


@dataclass(frozen=True)
class SequenceInfo:
    """Per-token facts of this rank's part of the sequence, shared by every layer."""

    positions: torch.Tensor
    """[b, s] int RoPE positions (they restart at each document when packed)."""
    doc_ids: torch.Tensor | None
    """[b, s] packed-document ids, or None for one sequence per row."""
    resets: torch.Tensor | None
    """[b, s] bool, True where a document starts (found on the whole sequence, before any split)."""

    @classmethod
    def of(cls, batch: Batch) -> SequenceInfo:
        """The facts of a (rank's piece of a) Batch; the one place a Batch becomes a SequenceInfo
        (the whole model's forward and each pipeline part)."""
        return cls(positions=batch.positions, doc_ids=batch.doc_ids, resets=batch.resets)


class SoftmaxAttend(Protocol):
    """Causal softmax attention over this rank's part of the sequence: q [b, s, h, d], k and v
    [b, s, h_kv, d] -> [b, s, h, d]; given `doc_ids` [b, s], attention stays inside each document."""

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                 doc_ids: torch.Tensor | None) -> torch.Tensor: ...


class LinearAttend(Protocol):
    """Causal linear attention (scale d^-0.5 on q): q, k, v [b, s, h, d] -> [b, s, h, d]; `log_decay`
    is None, per head [h] or per token [b, s, h]; `resets` [b, s] bool drop the state at document starts."""

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, log_decay: torch.Tensor | None,
                 resets: torch.Tensor | None) -> torch.Tensor: ...


class DeltaRuleAttend(Protocol):
    """The causal gated delta rule (ithaca.kernels.delta_rule; scale d_k^-0.5 on q): q, k [b, s, h, d_k],
    v [b, s, h, d_v], beta [b, s, h] -> [b, s, h, d_v]; `log_decay` None, [h] or [b, s, h];
    `resets` [b, s] bool drop the state at document starts."""

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, *,
                 log_decay: torch.Tensor | None, resets: torch.Tensor | None) -> torch.Tensor: ...


class ShortConv(Protocol):
    """The causal depthwise convolution along this rank's part of the sequence: x [b, s, c] with
    weight [c, K] -> [b, s, c]; no window reaches across a document start (`resets` [b, s] bool)."""

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, *, resets: torch.Tensor | None) -> torch.Tensor: ...


@dataclass(frozen=True)
class LocalSoftmaxAttend:
    """SoftmaxAttend on one device through the attention kernel dispatch."""

    kernels: KernelChoice = "auto"

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                 doc_ids: torch.Tensor | None) -> torch.Tensor:
        return attention(q, k, v, is_causal=True, doc_ids=doc_ids, impl=self.kernels)


@dataclass(frozen=True)
class LocalLinearAttend:
    """LinearAttend on one device through the linear-attention kernel dispatch."""

    kernels: KernelChoice = "auto"

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, log_decay: torch.Tensor | None,
                 resets: torch.Tensor | None) -> torch.Tensor:
        return linear_attention(q, k, v, log_decay, scale=q.shape[-1] ** -0.5, resets=resets, impl=self.kernels)[0]


@dataclass(frozen=True)
class LocalDeltaRuleAttend:
    """DeltaRuleAttend on one device through the delta-rule kernel dispatch."""

    kernels: KernelChoice = "auto"

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, *,
                 log_decay: torch.Tensor | None, resets: torch.Tensor | None) -> torch.Tensor:
        return delta_rule(q, k, v, beta, log_decay=log_decay, resets=resets, impl=self.kernels)[0]


def local_short_conv(x: torch.Tensor, weight: torch.Tensor, *, resets: torch.Tensor | None) -> torch.Tensor:
    """ShortConv on one device: the whole sequence is here, zeros before it."""
    return causal_conv1d(x, weight, resets=resets)


def recompute(fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args), its activations dropped after the forward and recomputed in the backward pass.

    Non-reentrant: it takes any arguments (a SequenceInfo), works with ZeRO-3's parameter hooks,
    and every rank recomputes in the same order, so collectives inside fn (ring, LASP-2, Ulysses,
    tp) pair up again. Nothing here draws random numbers, so the recomputation is exact.
    """
    if not torch.is_grad_enabled():
        return fn(*args)
    return checkpoint(fn, *args, use_reentrant=False)
