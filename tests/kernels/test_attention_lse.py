"""The ring step's kernels (out + log-sum-exp, and the backward from them) match autograd on the plain math."""

from __future__ import annotations

import pytest
import torch

from ithaca.kernels.attention import attention_reference
from ithaca.kernels.attention_lse import attention_lse_bwd, attention_lse_fwd

IMPLS = ["reference", "cpu", pytest.param("flash", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="flash-attn runs on CUDA only; this machine has no GPU"))]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(4, 4, 64), (4, 2, 128), (6, 1, 64)])
@pytest.mark.parametrize("causal, s_k", [(True, 37), (False, 37), (False, 20)])
def test_forward_lse_and_backward_match_autograd(impl, heads, kv_heads, head_dim, causal, s_k):
    device = "cuda" if impl == "flash" else "cpu"
    dtype = torch.bfloat16 if impl == "flash" else torch.float32
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, 37, heads, head_dim, generator=gen)
    k, v = (torch.randn(2, s_k, kv_heads, head_dim, generator=gen) for _ in range(2))
    dout = torch.randn(2, 37, heads, head_dim, generator=gen)
    scale = head_dim ** -0.5

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    want = attention_reference(*leaves, is_causal=causal)
    want.backward(dout)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k.repeat_interleave(heads // kv_heads, 2)) * scale
    if causal:
        scores = scores.masked_fill(torch.ones(37, s_k, dtype=torch.bool).triu(1), float("-inf"))
    want_lse = scores.logsumexp(-1)

    q_, k_, v_, dout_ = (t.to(device, dtype) for t in (q, k, v, dout))
    out, lse = attention_lse_fwd(q_, k_, v_, is_causal=causal, scale=scale, impl=impl)
    grads = attention_lse_bwd(dout_, q_, k_, v_, out, lse, is_causal=causal, scale=scale, impl=impl)
    # fp32 on CPU: summation order only (2e-5); bf16 flash-attn: bf16 rounding (2e-2).
    tol = dict(rtol=2e-5, atol=2e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out.float().cpu(), want, **tol)
    torch.testing.assert_close(lse.float().cpu(), want_lse, **tol)
    for name, got, leaf in zip(("dq", "dk", "dv"), grads, leaves):
        assert got.shape == leaf.shape
        torch.testing.assert_close(got.cpu(), leaf.grad, **tol, msg=lambda m: f"{name}: {m}")


def test_masked_block_with_an_empty_row_gives_zero_and_minus_infinity():
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 4, 2, 8, generator=gen) for _ in range(3))
    allowed = torch.ones(1, 4, 4, dtype=torch.bool)
    allowed[0, 2] = False  # query 2 reads nothing in this block
    out, lse = attention_lse_fwd(q, k, v, is_causal=False, scale=0.3, allowed=allowed)
    assert torch.all(out[0, 2] == 0) and torch.all(lse[0, :, 2] == float("-inf"))
    unmasked, _ = attention_lse_fwd(q, k, v, is_causal=False, scale=0.3, impl="reference")
    torch.testing.assert_close(out[:, [0, 1, 3]], unmasked[:, [0, 1, 3]])  # the other rows are untouched
    dq, dk, dv = attention_lse_bwd(torch.ones_like(out), q, k, v, out, lse, is_causal=False, scale=0.3, allowed=allowed)
    assert torch.all(dq[0, 2] == 0) and torch.isfinite(dk).all() and torch.isfinite(dv).all()


def test_bad_inputs():
    q = torch.randn(1, 4, 4, 8)
    with pytest.raises(ValueError, match="causal needs as many queries as keys"):
        attention_lse_fwd(q, q[:, :3], q[:, :3], is_causal=True, scale=1.0)
    with pytest.raises(ValueError, match="impl='fast'"):
        attention_lse_fwd(q, q, q, is_causal=True, scale=1.0, impl="fast")
    with pytest.raises(ValueError, match="impl='cpu' takes no mask"):
        attention_lse_fwd(q, q, q, is_causal=True, scale=1.0, impl="cpu", allowed=torch.ones(1, 4, 4, dtype=torch.bool))
