"""Each attention path matches the plain-PyTorch reference on the same inputs (outputs and grads)."""

from __future__ import annotations

import pytest
import torch

from ithaca.kernels.attention import attention

IMPLS = ["sdpa", pytest.param("flash", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="flash-attn runs on CUDA only; this machine has no GPU"))]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("packed", [False, True])
def test_matches_reference(impl, heads, kv_heads, causal, packed):
    device = "cuda" if impl == "flash" else "cpu"
    dtype = torch.bfloat16 if impl == "flash" else torch.float32
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 37, heads, 64, generator=gen)  # odd length: no block-size luck
    k, v = (torch.randn(2, 37, kv_heads, 64, generator=gen) for _ in range(2))
    cotangent = torch.randn(2, 37, heads, 64, generator=gen)
    # documents of lengths 10, 1, 26 in row 0 and 37 in row 1
    doc_ids = torch.tensor([[0] * 10 + [1] + [2] * 26, [5] * 37]).to(device) if packed else None
    results = {}
    for name in ("reference", impl):
        inputs = [t.to(device, dtype).requires_grad_() for t in (q, k, v)]
        out = attention(*inputs, is_causal=causal, doc_ids=doc_ids, impl=name)
        out.backward(cotangent.to(device, dtype))
        results[name] = [out.float().cpu()] + [t.grad.float().cpu() for t in inputs]
    # fp32 on CPU: different summation order only (1e-5); bf16 flash-attn: bf16 rounding (2e-2).
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for name, got, want in zip(("out", "dq", "dk", "dv"), results[impl], results["reference"]):
        torch.testing.assert_close(got, want, **tol, msg=lambda m: f"{name}: {m}")


def test_documents_do_not_see_each_other():
    q, k, v = torch.randn(3, 1, 6, 2, 8).unbind(0)
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 1]])
    packed = attention(q, k, v, is_causal=True, doc_ids=doc_ids, impl="sdpa")
    for doc in (slice(0, 3), slice(3, 6)):  # each document alone gives the same rows
        alone = attention(q[:, doc], k[:, doc], v[:, doc], is_causal=True, impl="sdpa")
        torch.testing.assert_close(packed[:, doc], alone, rtol=1e-6, atol=1e-6)


def test_bad_shapes_and_impl():
    q, kv = torch.randn(1, 4, 4, 8), torch.randn(1, 4, 3, 8)
    with pytest.raises(ValueError, match="q heads 4 must be a multiple of kv heads 3"):
        attention(q, kv, kv)
    with pytest.raises(ValueError, match="doc_ids must be"):
        attention(q, q, q, doc_ids=torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="causal or document masks need as many queries as keys"):
        attention(q, torch.randn(1, 5, 4, 8), torch.randn(1, 5, 4, 8))
    with pytest.raises(ValueError, match="impl='fast'"):
        attention(q, q, q, impl="fast")
