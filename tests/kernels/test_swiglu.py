"""SwiGLU's Triton kernels (forward and backward) match the reference, on contiguous inputs and on
the two halves of one projection; the dispatch refuses what it cannot run."""

from __future__ import annotations

import pytest
import torch

from ithaca.kernels import swiglu

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F = 40  # 3 column tiles of 16 under the interpreter, the last one ragged
# fp32: sigmoid and exp implementations differ by an ulp or so. bf16: outputs and gradients are
# rounded to bf16, whose neighbours are up to 2^-7 = 7.8e-3 apart (relative), and triton 3.9's
# interpreter truncates fp32 -> bf16 where torch rounds to nearest: the two may land one step apart.
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1e-2, atol=1e-2)}


def _inputs(layout: str, gen: torch.Generator, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A leaf [2, 7, 2F] and (gate, up) [2, 7, F] from it: chunk views ("halves") or contiguous copies."""
    leaf = (torch.randn(2, 7, 2 * F, generator=gen) * 4).to(DEVICE, dtype).requires_grad_()  # *4: silu's tails
    gate, up = leaf.chunk(2, dim=-1)
    if layout == "contiguous":
        gate, up = gate.contiguous(), up.contiguous()
    return leaf, gate, up


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "halves"])
def test_triton_matches_reference(dtype, layout):
    results = {}
    for impl in ("reference", "triton"):
        gen = torch.Generator().manual_seed(0)  # the same inputs and cotangent for both
        leaf, gate, up = _inputs(layout, gen, dtype)
        y = swiglu(gate, up, impl=impl)
        y.backward(torch.randn(y.shape, generator=gen).to(DEVICE, dtype))
        dgate, dup = leaf.grad.chunk(2, dim=-1)
        results[impl] = dict(y=y, dgate=dgate, dup=dup)
        assert y.dtype == dtype
    for name, want in results["reference"].items():
        torch.testing.assert_close(results["triton"][name].float().cpu(), want.float().cpu(), **TOL[dtype],
                                   msg=lambda m: f"{name}: {m}")


def test_auto_on_cpu_is_the_reference():
    gate, up = torch.randn(2, 3, 8).unbind(0)
    assert torch.equal(swiglu(gate, up), swiglu(gate, up, impl="reference"))


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="impl='triton' needs a CUDA tensor"):
        swiglu(torch.randn(3, 8), torch.randn(3, 8), impl="triton")


def test_bad_arguments():
    with pytest.raises(ValueError, match="impl='fast'"):
        swiglu(torch.randn(3, 8), torch.randn(3, 8), impl="fast")
    with pytest.raises(ValueError, match="up must have gate's shape"):
        swiglu(torch.randn(3, 8), torch.randn(3, 7))
