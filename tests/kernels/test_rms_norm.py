"""RMSNorm's Triton kernels (forward and backward, with and without the fused residual add)
match the reference; the dispatch refuses what it cannot run."""

from __future__ import annotations

import pytest
import torch

from ithaca.kernels import rms_norm

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp32: summation order only. bf16: outputs and gradients are rounded to bf16, whose neighbours
# are up to 2^-7 = 7.8e-3 apart (relative), and triton 3.9's interpreter truncates fp32 -> bf16
# where torch rounds to nearest: the two may land one step apart.
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1e-2, atol=1e-2)}


def _run(impl: str, x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None,
         cotangents: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Outputs and gradients by name, as fp32 on the CPU, under a random cotangent for every output."""
    leaves = {"x": x, "weight": weight} | ({} if residual is None else {"residual": residual})
    leaves = {name: t.detach().clone().requires_grad_() for name, t in leaves.items()}
    out = rms_norm(leaves["x"], leaves["weight"], 1e-5, leaves.get("residual"), impl=impl)
    outs = {"y": out} if residual is None else dict(zip(("y", "s"), out))
    torch.autograd.backward(list(outs.values()), cotangents)
    return {name: t.detach().float().cpu() for name, t in outs.items()} | \
        {f"d{name}": t.grad.float().cpu() for name, t in leaves.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("shape, weight_shape", [
    ((2, 7, 40), (40,)),  # 14 rows: 4 row blocks under the interpreter; dim 40 pads to 64
    ((3, 5, 3, 24), (3, 24)),  # per-head gains: [b, s, heads, head_dim], 15 rows per head
    ((13, 1), (1,)),  # dim 1
])
def test_triton_matches_reference(dtype, with_residual, shape, weight_shape):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=gen) * 3).to(DEVICE, dtype)
    weight = (1 + torch.randn(weight_shape, generator=gen)).to(DEVICE, dtype)
    residual = torch.randn(shape, generator=gen).to(DEVICE, dtype) if with_residual else None
    cotangents = [torch.randn(shape, generator=gen).to(DEVICE, dtype) for _ in range(1 + with_residual)]
    want = _run("reference", x, weight, residual, cotangents)
    got = _run("triton", x, weight, residual, cotangents)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], **TOL[dtype], msg=lambda m: f"{name}: {m}")


def test_residual_sum_is_rounded_like_eager_add():
    """s must equal eager bf16 `x + residual` bit for bit: it is the residual stream the next block adds to."""
    gen = torch.Generator().manual_seed(1)
    x, residual = (torch.randn(9, 40, generator=gen).to(DEVICE, torch.bfloat16) for _ in range(2))
    _, s = rms_norm(x, torch.ones(40, device=DEVICE), 1e-5, residual, impl="triton")
    assert torch.equal(s, x + residual)


def test_strided_input():
    """x with a row stride (a slice of a wider tensor) is read in place, not misread as contiguous."""
    gen = torch.Generator().manual_seed(2)
    wide = torch.randn(6, 2, 64, generator=gen).to(DEVICE)
    x = wide[..., :40]
    weight = torch.randn(2, 40, generator=gen).to(DEVICE)
    torch.testing.assert_close(rms_norm(x, weight, 1e-6, impl="triton"), rms_norm(x, weight, 1e-6, impl="reference"),
                               rtol=1e-5, atol=1e-5)  # fp32: summation order only


def test_auto_on_cpu_is_the_reference():
    x, weight = torch.randn(3, 8), torch.randn(8)
    assert torch.equal(rms_norm(x, weight, 1e-5), rms_norm(x, weight, 1e-5, impl="reference"))


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="impl='triton' needs a CUDA tensor"):
        rms_norm(torch.randn(3, 8), torch.randn(8), 1e-5, impl="triton")


def test_bad_arguments():
    x = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match="impl='fast'"):
        rms_norm(x, torch.randn(8), 1e-5, impl="fast")
    with pytest.raises(ValueError, match="weight must be"):
        rms_norm(x, torch.randn(7), 1e-5)
    with pytest.raises(ValueError, match="weight must be"):
        rms_norm(x, torch.randn(2, 8), 1e-5)  # heads 2 but x has 3 in that dim
    with pytest.raises(ValueError, match="residual must"):
        rms_norm(x, torch.randn(8), 1e-5, torch.randn(2, 3, 7))
    with pytest.raises(ValueError, match="residual must"):
        rms_norm(x, torch.randn(8), 1e-5, torch.randn(2, 3, 8, dtype=torch.bfloat16))
