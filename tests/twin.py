"""The twin check every sequence-parallel attention test uses.

Every rank draws the whole q, k, v, cotangent (and documents) from one seed, computes the plain
single-process attention and its gradients, then runs the parallel function on its own part and
compares its part of the output and of every gradient under the random cotangent.
"""

from __future__ import annotations

from typing import Callable

import torch

from ithaca.kernels.attention import attention_reference


def random_doc_ids(b: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """[b, n] ids of packed documents of random lengths (about 7 tokens), crossing chunk edges."""
    starts = torch.rand(b, n, generator=gen) < 0.15
    starts[:, 0] = True
    return starts.long().cumsum(1) - 1


def check_attention_twin(attend: Callable[..., torch.Tensor], part: Callable[[torch.Tensor], torch.Tensor], *,
                         b: int, n: int, heads: int, kv_heads: int, head_dim: int, causal: bool, packed: bool,
                         seed: int, tol: dict, where: str) -> None:
    """attend(q, k, v, doc_ids) on this rank's part (`part`: whole tensor -> this rank's piece) must
    equal the reference's part, output and q/k/v gradients."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, n, heads, head_dim, generator=gen, requires_grad=True)
    k = torch.randn(b, n, kv_heads, head_dim, generator=gen, requires_grad=True)
    v = torch.randn(b, n, kv_heads, head_dim, generator=gen, requires_grad=True)
    cotangent = torch.randn(b, n, heads, head_dim, generator=gen)
    doc_ids = random_doc_ids(b, n, gen) if packed else None
    full = attention_reference(q, k, v, is_causal=causal, doc_ids=doc_ids)
    full.backward(cotangent)

    local = [part(t.detach()).requires_grad_() for t in (q, k, v)]
    out = attend(*local, None if doc_ids is None else part(doc_ids))
    out.backward(part(cotangent))
    torch.testing.assert_close(out, part(full.detach()), **tol, msg=lambda m: f"out {where}: {m}")
    for name, mine, ref in zip(("dq", "dk", "dv"), local, (q, k, v)):
        torch.testing.assert_close(mine.grad, part(ref.grad), **tol, msg=lambda m: f"{name} {where}: {m}")
