"""RoPE's Triton kernel (q and k in one launch, forward and backward) matches the reference, the
reference matches an independent complex-number rotation, and the dispatch refuses bad input."""

from __future__ import annotations

import pytest
import torch

from ithaca.kernels import rope
from ithaca.kernels.rope import rope_inv_freq

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
B, S, H, H_KV, D = 2, 13, 3, 2, 40  # 26 tokens: 7 programs of 4 under the interpreter; d/2 = 20 pads to 32
THETA = 10000.0
FREQ = rope_inv_freq(D, THETA, torch.device(DEVICE))
# fp32: the angles are the same fp32 numbers on both sides; cos/sin implementations differ by an
# ulp or so. bf16: outputs and gradients are rounded to bf16, whose neighbours are up to
# 2^-7 = 7.8e-3 apart (relative), and triton 3.9's interpreter truncates fp32 -> bf16 where torch
# rounds to nearest: the two may land one step apart.
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1e-2, atol=1e-2)}


def _positions() -> torch.Tensor:
    """Row 0 packs documents of 5 and 8 tokens (positions restart mid-row); row 1 is a slice at offset 900.

    Stored column-major (strides (1, b)), so a kernel that ignores the strides of positions fails.
    """
    rows = torch.tensor([list(range(5)) + list(range(8)), list(range(900, 900 + S))], device=DEVICE)
    return rows.T.contiguous().T


LEAF_SHAPES = {  # the tensor q and k are cut from, per layout
    "contiguous": (B, S, H + H_KV, D),  # cut, then copied: plain contiguous q and k
    "fused": (B, S, H + 2 * H_KV, D),  # q, k, v heads of one projection: q and k are strided views
    "strided_d": (B, S, H + H_KV, 2 * D),  # every other channel: the kernel must copy to unit stride
}


def _cut(layout: str, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, S, H, D] and k [B, S, H_KV, D] out of a tensor of LEAF_SHAPES[layout] (or its gradient)."""
    if layout == "strided_d":
        return t[:, :, :H, ::2], t[:, :, H:, ::2]
    return t[:, :, :H], t[:, :, H:H + H_KV]


@pytest.mark.parametrize("scale", [1.0, 1.2])  # 1.2: YaRN's attention factor multiplies cos and sin
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", list(LEAF_SHAPES))
def test_triton_matches_reference(dtype, layout, scale):
    results = {}
    for impl in ("reference", "triton"):
        gen = torch.Generator().manual_seed(0)  # the same inputs and cotangents for both
        leaf = torch.randn(LEAF_SHAPES[layout], generator=gen).to(DEVICE, dtype).requires_grad_()
        q, k = _cut(layout, leaf)
        if layout == "contiguous":
            q, k = q.contiguous(), k.contiguous()
        q_rot, k_rot = rope(q, k, _positions(), FREQ, scale=scale, impl=impl)
        assert q_rot.dtype == k_rot.dtype == dtype
        torch.autograd.backward([q_rot, k_rot], [torch.randn(t.shape, generator=gen).to(DEVICE, dtype)
                                                 for t in (q, k)])
        dq, dk = _cut(layout, leaf.grad)
        results[impl] = dict(q_rot=q_rot, k_rot=k_rot, dq=dq, dk=dk)
    for name, want in results["reference"].items():
        torch.testing.assert_close(results["triton"][name].float().cpu(), want.float().cpu(), **TOL[dtype],
                                   msg=lambda m: f"{name}: {m}")


def test_packed_document_equals_document_alone():
    """A token at position p rotates the same wherever its document sits in the row."""
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, S, H, D, generator=gen).to(DEVICE)
    k = torch.randn(1, S, H_KV, D, generator=gen).to(DEVICE)
    q_rot, k_rot = rope(q, k, _positions()[:1], FREQ, impl="triton")
    alone_q, alone_k = rope(q[:, 5:], k[:, 5:], torch.arange(8, device=DEVICE)[None], FREQ, impl="triton")
    torch.testing.assert_close(q_rot[:, 5:], alone_q, rtol=0, atol=0)  # same positions, same arithmetic
    torch.testing.assert_close(k_rot[:, 5:], alone_k, rtol=0, atol=0)


def test_reference_is_the_complex_rotation():
    """Pin the reference to RoPE's definition: pair (x_i, x_{i+d/2}) as the complex number
    x_i + i x_{i+d/2} and multiply it by e^{i p theta^(-2i/d)}, in float64."""
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(B, S, H, D, generator=gen)
    k = torch.randn(B, S, H_KV, D, generator=gen)
    positions = _positions().cpu()
    q_rot, k_rot = rope(q, k, positions, FREQ.cpu(), impl="reference")
    freqs = torch.tensor([THETA ** (-2 * i / D) for i in range(D // 2)], dtype=torch.float64)
    turn = torch.polar(torch.ones(B, S, 1, D // 2, dtype=torch.float64),
                       positions.double()[:, :, None, None] * freqs)  # e^{i angle}: [b, s, 1, d/2]
    for name, x, got in (("q", q, q_rot), ("k", k, k_rot)):
        z = torch.complex(x[..., :D // 2].double(), x[..., D // 2:].double()) * turn
        want = torch.cat((z.real, z.imag), dim=-1)
        # fp32 angles: inv_freq and the product p * inv_freq each round (2^-24 relative), so at
        # p = 912 an angle is off by up to ~1.6e-4 rad; times |x| < 5 that is under 1e-3. A wrong
        # pairing or frequency convention is off by O(1).
        torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-3, msg=lambda m: f"{name}: {m}")


def test_auto_on_cpu_is_the_reference():
    q, k = torch.randn(1, 4, 2, 8), torch.randn(1, 4, 1, 8)
    positions, freq = torch.arange(4)[None], rope_inv_freq(8, THETA)
    for got, want in zip(rope(q, k, positions, freq), rope(q, k, positions, freq, impl="reference")):
        assert torch.equal(got, want)


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="impl='triton' needs a CUDA tensor"):
        rope(q, q, torch.arange(4)[None], rope_inv_freq(8, THETA), impl="triton")


def test_bad_arguments():
    q, k = torch.randn(2, 4, 2, 8), torch.randn(2, 4, 1, 8)
    positions, freq = torch.arange(4).expand(2, 4), rope_inv_freq(8, THETA)
    with pytest.raises(ValueError, match="impl='fast'"):
        rope(q, k, positions, freq, impl="fast")
    with pytest.raises(ValueError, match="q and k must be"):
        rope(q[0], k, positions, freq)
    with pytest.raises(ValueError, match="k .* must share"):
        rope(q, k[:, :3], positions, freq)
    with pytest.raises(ValueError, match="k .* must share"):
        rope(q, k[:1], positions, freq)
    with pytest.raises(ValueError, match="head_dim=7 must be even"):
        rope(q[..., :7], k[..., :7], positions, freq[:3])
    with pytest.raises(ValueError, match="positions must be"):
        rope(q, k, positions[:, :3], freq)
    with pytest.raises(ValueError, match="positions must be"):
        rope(q, k, positions.float(), freq)
    with pytest.raises(ValueError, match="inv_freq must be fp32"):
        rope(q, k, positions, freq[:3])
    with pytest.raises(ValueError, match="inv_freq must be fp32"):
        rope(q, k, positions, freq.bfloat16())
