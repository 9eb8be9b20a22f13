"""The ring step's kernels (out + log-sum-exp, and the backward from them) against the dense reference.

Triton runs under TRITON_INTERPRET=1 without a GPU (tests/conftest.py) and compiled with one; its
tiles are 16 under the interpreter, so the shapes below (37 queries, 20 or 37 keys) cross tile
edges, end in partial tiles, and the document layouts include documents starting exactly on a
tile edge and queries whose document has no key in the block.
"""

from __future__ import annotations

import sys

import pytest
import torch

from ithaca.kernels.attention import attention_lse_bwd, attention_lse_fwd
from ithaca.kernels.attention.reference import attention_lse_bwd_reference, attention_lse_fwd_reference
from ithaca.kernels.attention.tiled import attention_lse_bwd_tiled, attention_lse_fwd_tiled
from twin import random_doc_ids

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
NO_CUDA = pytest.mark.skipif(not CUDA, reason="flash-attn runs on CUDA only; this machine has no GPU")


def _docs(kind: str, b: int, n: int, gen: torch.Generator) -> torch.Tensor | None:
    if kind == "none":
        return None
    if kind == "edges":  # documents starting exactly at tile edges 16 and 32 (interpreter tiles are 16)
        return (torch.arange(n) // 16).expand(b, n).contiguous()
    return random_doc_ids(b, n, gen)  # "random": about 7 tokens each


def _inputs(b, s_q, s_k, heads, kv_heads, d, docs, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, s_q, heads, d, generator=gen)
    k, v = (torch.randn(b, s_k, kv_heads, d, generator=gen) for _ in range(2))
    dout = torch.randn(b, s_q, heads, d, generator=gen)
    k_docs = _docs(docs, b, s_k, gen)
    # the queries are the last s_q tokens of the keys' sequence (a causal ring block), or their own
    q_docs = None if k_docs is None else (k_docs[:, -s_q:] if s_q <= s_k else _docs(docs, b, s_q, gen))
    return q, k, v, dout, q_docs, k_docs


def _compare(impl_fwd, impl_bwd, dtype, tol, *, b=2, s_q=37, s_k=37, heads=4, kv_heads=2, d=24, causal=True,
             docs="random", seed=0):
    q, k, v, dout, q_docs, k_docs = _inputs(b, s_q, s_k, heads, kv_heads, d, docs, seed)
    q, k, v, dout = (t.to(DEVICE, dtype) for t in (q, k, v, dout))
    masks = dict(is_causal=causal, scale=d ** -0.5, q_doc_ids=None if q_docs is None else q_docs.to(DEVICE),
                 k_doc_ids=None if k_docs is None else k_docs.to(DEVICE))
    want_out, want_lse = attention_lse_fwd_reference(q, k, v, **masks)
    want_grads = attention_lse_bwd_reference(dout, q, k, v, want_out, want_lse, **masks)
    out, lse = impl_fwd(q, k, v, **masks)
    grads = impl_bwd(dout, q, k, v, out, lse, **masks)
    torch.testing.assert_close(out.float(), want_out.float(), **tol, msg=lambda m: f"out: {m}")
    torch.testing.assert_close(lse, want_lse, **tol, msg=lambda m: f"lse: {m}")  # -inf rows must match too
    for name, got, want in zip(("dq", "dk", "dv"), grads, want_grads):
        assert got.dtype == torch.float32 and got.shape == want.shape, name
        torch.testing.assert_close(got, want, **tol, msg=lambda m: f"{name}: {m}")


# fp32: summation order only (2e-5). bf16: the kernels round probabilities and dS to bf16 before
# their matmuls, as flash-attention does; with O(1) inputs that moves results by up to ~3e-2.
FP32, BF16 = dict(rtol=2e-5, atol=2e-5), dict(rtol=4e-2, atol=4e-2)
CASES = [  # (s_q, s_k, heads, kv_heads, d, causal, docs)
    (37, 37, 4, 4, 32, True, "none"),
    (37, 37, 4, 2, 24, True, "random"),
    (37, 37, 6, 1, 16, True, "edges"),
    (21, 37, 4, 2, 24, True, "random"),   # causal over more keys than queries: bottom-right aligned
    (37, 20, 4, 2, 24, False, "none"),    # a ring block of the first half of the keys
    (37, 20, 4, 4, 40, False, "random"),  # queries whose document has no key here: out 0, lse -inf
    (37, 37, 2, 2, 24, False, "edges"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_triton_fp32(case):
    from ithaca.kernels.attention.triton import attention_lse_bwd_triton, attention_lse_fwd_triton

    s_q, s_k, heads, kv_heads, d, causal, docs = case
    _compare(attention_lse_fwd_triton, attention_lse_bwd_triton, torch.float32, FP32, s_q=s_q, s_k=s_k,
             heads=heads, kv_heads=kv_heads, d=d, causal=causal, docs=docs)


@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[5]], ids=lambda c: "-".join(map(str, c)))
def test_triton_bf16(case):
    from ithaca.kernels.attention.triton import attention_lse_bwd_triton, attention_lse_fwd_triton

    s_q, s_k, heads, kv_heads, d, causal, docs = case
    _compare(attention_lse_fwd_triton, attention_lse_bwd_triton, torch.bfloat16, BF16, s_q=s_q, s_k=s_k,
             heads=heads, kv_heads=kv_heads, d=d, causal=causal, docs=docs)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_tiled(case):
    s_q, s_k, heads, kv_heads, d, causal, docs = case
    tiled = dict(tile=8)  # several tiles per side, partial last ones

    _compare(lambda *a, **m: attention_lse_fwd_tiled(*a, **m, **tiled),
             lambda *a, **m: attention_lse_bwd_tiled(*a, **m, **tiled), torch.float32, FP32, s_q=s_q, s_k=s_k,
             heads=heads, kv_heads=kv_heads, d=d, causal=causal, docs=docs)


ON_CPU = pytest.mark.skipif(CUDA, reason="torch's CPU flash kernel takes CPU tensors; this run's are on CUDA")
FUSED = [pytest.param("cpu", torch.float32, marks=ON_CPU), pytest.param("cpu", torch.bfloat16, marks=ON_CPU),
         pytest.param("flash", torch.bfloat16, marks=NO_CUDA)]


@pytest.mark.parametrize("impl, dtype", FUSED)
@pytest.mark.parametrize("case", [c for c in CASES if c[6] == "none" and (c[0] == c[1] or not c[5])],
                         ids=lambda c: "-".join(map(str, c)))
def test_fused_without_documents(impl, dtype, case):
    s_q, s_k, heads, kv_heads, d, causal, docs = case
    _compare(lambda *a, **m: attention_lse_fwd(*a, **m, impl=impl),
             lambda *a, **m: attention_lse_bwd(*a, **m, impl=impl), dtype, BF16 if dtype == torch.bfloat16 else FP32,
             s_q=s_q, s_k=s_k, heads=heads, kv_heads=kv_heads, d=d, causal=causal, docs=docs)


def test_a_block_with_no_key_for_some_queries():
    """Queries of a document absent from the block read nothing: out 0, lse -inf, zero dq, finite dk/dv."""
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 20, 2, 16, generator=gen).to(DEVICE) for _ in range(3))
    k_docs = torch.zeros(1, 20, dtype=torch.long, device=DEVICE)
    q_docs = torch.zeros(1, 20, dtype=torch.long, device=DEVICE)
    q_docs[0, 16:] = 3  # the last tile's queries, from exactly a tile edge on
    for impl in ("triton", "tiled", "reference"):
        out, lse = attention_lse_fwd(q, k, v, is_causal=False, scale=0.3, q_doc_ids=q_docs, k_doc_ids=k_docs, impl=impl)
        assert torch.all(out[0, 16:] == 0) and torch.all(lse[0, :, 16:] == float("-inf")), impl
        assert torch.isfinite(out).all() and torch.isfinite(lse[0, :, :16]).all(), impl
        dq, dk, dv = attention_lse_bwd(torch.ones_like(out), q, k, v, out, lse, is_causal=False, scale=0.3,
                                       q_doc_ids=q_docs, k_doc_ids=k_docs, impl=impl)
        assert torch.all(dq[0, 16:] == 0) and torch.isfinite(dk).all() and torch.isfinite(dv).all(), impl


def test_auto_never_takes_the_dense_reference(monkeypatch):
    # the package module itself: `ithaca.kernels.attention` the attribute is the function
    dispatch = sys.modules["ithaca.kernels.attention"]
    chosen = []
    real = dispatch.choose
    monkeypatch.setattr(dispatch, "choose", lambda *args: chosen.append(real(*args)) or chosen[-1])
    q = torch.randn(1, 8, 2, 16, device=DEVICE)
    docs = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]], device=DEVICE)
    attention_lse_fwd(q, q, q, is_causal=True, scale=0.25, q_doc_ids=docs, k_doc_ids=docs)
    attention_lse_fwd(q, q, q, is_causal=True, scale=0.25)
    attention_lse_fwd(q, q[:, :5], q[:, :5], is_causal=False, scale=0.25)
    assert chosen == (["triton"] * 3 if CUDA else ["tiled", "cpu", "cpu"])


def test_bad_inputs():
    q = torch.randn(1, 4, 4, 8)
    docs = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="q heads 4 must be a multiple of kv heads 3"):
        attention_lse_fwd(q, q[:, :, :3], q[:, :, :3], is_causal=True, scale=1.0)
    with pytest.raises(ValueError, match="impl='fast'"):
        attention_lse_fwd(q, q, q, is_causal=True, scale=1.0, impl="fast")
    with pytest.raises(ValueError, match="q, k and v must share one dtype"):
        attention_lse_fwd(q, q.bfloat16(), q.bfloat16(), is_causal=True, scale=1.0)
    with pytest.raises(ValueError, match="impl='flash' takes no document ids; use"):
        attention_lse_fwd(q, q, q, is_causal=True, scale=1.0, impl="flash", q_doc_ids=docs, k_doc_ids=docs)
    with pytest.raises(ValueError, match="impl='cpu' takes no document ids and no causal mask over other keys"):
        attention_lse_fwd(q, q[:, :3], q[:, :3], is_causal=True, scale=1.0, impl="cpu")
    with pytest.raises(ValueError, match="impl='cpu' takes no document ids"):
        attention_lse_fwd(q, q, q, is_causal=True, scale=1.0, impl="cpu", q_doc_ids=docs, k_doc_ids=docs)
    with pytest.raises(ValueError, match="kv_doc_ids must be"):
        attention_lse_fwd(q, q, q, is_causal=True, scale=1.0, q_doc_ids=docs, k_doc_ids=docs[:, :3])
    with pytest.raises(ValueError, match="give the keys' documents"):
        attention_lse_fwd(q, q[:, :3], q[:, :3], is_causal=False, scale=1.0, q_doc_ids=docs)


def test_triton_refused_on_cpu_without_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="impl='triton' needs a CUDA tensor"):
        attention_lse_fwd(q, q, q, is_causal=True, scale=1.0, impl="triton")
