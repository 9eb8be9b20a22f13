"""Whole attention (differentiable) through every implementation matches the dense reference."""

from __future__ import annotations

import pytest
import torch

from ithaca.kernels.attention import attention

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
NO_CUDA = pytest.mark.skipif(not CUDA, reason="flash-attn runs on CUDA only; this machine has no GPU")


CASES = [("sdpa", False), ("tiled", False), ("tiled", True), ("triton", False), ("triton", True),  # sdpa takes
         pytest.param("flash", False, marks=NO_CUDA), pytest.param("flash", True, marks=NO_CUDA)]  # no documents


@pytest.mark.parametrize("impl, packed", CASES)
@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (6, 1)])
@pytest.mark.parametrize("causal", [True, False])
def test_matches_reference(impl, heads, kv_heads, causal, packed):
    dtype = torch.bfloat16 if impl == "flash" else torch.float32
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 37, heads, 32, generator=gen)  # odd length: no block-size luck
    k, v = (torch.randn(2, 37, kv_heads, 32, generator=gen) for _ in range(2))
    cotangent = torch.randn(2, 37, heads, 32, generator=gen)
    # documents of lengths 16, 1, 20 in row 0 (one starting on the interpreter's tile edge) and 37 in row 1
    doc_ids = torch.tensor([[0] * 16 + [1] + [2] * 20, [5] * 37]).to(DEVICE) if packed else None
    results = {}
    for name in ("reference", impl):
        inputs = [t.to(DEVICE, dtype).requires_grad_() for t in (q, k, v)]
        out = attention(*inputs, is_causal=causal, doc_ids=doc_ids, impl=name)
        out.backward(cotangent.to(DEVICE, dtype))
        results[name] = [out.float().cpu()] + [t.grad.float().cpu() for t in inputs]
    # fp32: summation order only (2e-5); bf16 flash-attn: bf16 rounding (4e-2).
    tol = dict(rtol=2e-5, atol=2e-5) if dtype == torch.float32 else dict(rtol=4e-2, atol=4e-2)
    for name, got, want in zip(("out", "dq", "dk", "dv"), results[impl], results["reference"]):
        torch.testing.assert_close(got, want, **tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("impl", ["tiled", "triton", "reference"])
def test_queries_over_more_keys_with_their_own_documents(impl):
    """A piece of queries over every key up to its end (all-gather-K/V's call): causal bottom-right."""
    gen = torch.Generator().manual_seed(1)
    k, v = (torch.randn(1, 40, 2, 16, generator=gen) for _ in range(2))
    q = torch.randn(1, 40, 4, 16, generator=gen)
    docs = torch.tensor([[0] * 12 + [1] * 19 + [2] * 9])
    whole = attention(q, k, v, is_causal=True, doc_ids=docs, impl="reference")
    piece = attention(q[:, 24:], k, v, is_causal=True, doc_ids=docs[:, 24:], kv_doc_ids=docs, impl=impl)
    torch.testing.assert_close(piece, whole[:, 24:], rtol=2e-5, atol=2e-5)


def test_documents_do_not_see_each_other():
    q, k, v = torch.randn(3, 1, 6, 2, 16).unbind(0)
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 1]])
    packed = attention(q, k, v, is_causal=True, doc_ids=doc_ids)
    for doc in (slice(0, 3), slice(3, 6)):  # each document alone gives the same rows
        alone = attention(q[:, doc], k[:, doc], v[:, doc], is_causal=True)
        torch.testing.assert_close(packed[:, doc], alone, rtol=1e-6, atol=1e-6)


def test_bad_shapes_and_impl():
    q, kv = torch.randn(1, 4, 4, 8), torch.randn(1, 4, 3, 8)
    docs = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="q heads 4 must be a multiple of kv heads 3"):
        attention(q, kv, kv)
    with pytest.raises(ValueError, match="doc_ids must be"):
        attention(q, q, q, doc_ids=torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="impl='sdpa' takes no document ids"):
        attention(q, q, q, doc_ids=docs, impl="sdpa")
    with pytest.raises(ValueError, match="impl='flash' takes no kv_doc_ids and no scale"):
        attention(q, q, q, scale=0.3, impl="flash")
    with pytest.raises(ValueError, match="impl='fast'"):
        attention(q, q, q, impl="fast")
