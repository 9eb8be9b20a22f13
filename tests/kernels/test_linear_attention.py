"""Linear attention: the chunked form and the Triton kernels (TRITON_INTERPRET=1 off CUDA) equal the
token-by-token recurrence, forward and backward, for every decay kind, with initial states and
document resets; and the dispatch's choices and errors."""

from __future__ import annotations

import sys
from functools import partial

import pytest
import torch

from ithaca.kernels.linear_attention import linear_attention
from ithaca.kernels.linear_attention.chunked import linear_attention_chunked
from ithaca.kernels.linear_attention.reference import linear_attention_reference

B, H = 2, 2
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # Triton compiled on a GPU, interpreted without
# fp32: the chunked forms only reorder the recurrence's sums (seen: ~1e-6 relative); 1e-4 absolute
# also covers the [h] decay's gradient, a sum over b*s tokens of terms of size ~10.
FP32 = dict(rtol=1e-4, atol=1e-4)


def make_inputs(kind: str, s: int, d_k: int, d_v: int, with_state: bool, with_resets: bool,
                gen: torch.Generator) -> dict[str, torch.Tensor | None]:
    """fp32 leaves for linear_attention; log_decay of the "fixed" kind is [h], "gated" [b, s, h]."""
    inputs = {"q": torch.randn(B, s, H, d_k, generator=gen), "k": torch.randn(B, s, H, d_k, generator=gen),
              "v": torch.randn(B, s, H, d_v, generator=gen), "log_decay": None, "initial_state": None, "resets": None}
    if kind == "fixed":  # retention-style per-head decays
        inputs["log_decay"] = torch.log(1 - 2.0 ** (-3 - torch.arange(H, dtype=torch.float32)))
    if kind == "gated":  # gates in (0, 1)
        inputs["log_decay"] = torch.nn.functional.logsigmoid(torch.randn(B, s, H, generator=gen) + 2)
    if with_state:
        inputs["initial_state"] = torch.randn(B, H, d_k, d_v, generator=gen)
    if with_resets:
        resets = torch.rand(B, s, generator=gen) < 0.1
        resets[0, 0] = True  # a document starting on the very first token drops the incoming state
        resets[1, 16] = True  # on the interpreter's chunk edge (16 tokens)
        resets[1, 15] = True  # and a one-token document that ends a chunk
        inputs["resets"] = resets
    return {name: None if t is None else t.to(DEVICE) for name, t in inputs.items()}


def run(fn, inputs: dict, dtype: torch.dtype, cotangents: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fn(q, k, v, log_decay, initial_state=, resets=) with q, k, v in `dtype`, backward from random
    cotangents on out and on the final state -> {"out", "final_state", "dq", ...} in fp32."""
    leaves = {name: None if t is None else t.clone().to(dtype if name in ("q", "k", "v") else t.dtype).requires_grad_()
              for name, t in inputs.items() if name != "resets"}
    out, final = fn(leaves["q"], leaves["k"], leaves["v"], leaves["log_decay"], initial_state=leaves["initial_state"],
                    resets=inputs["resets"])
    ((out.float() * cotangents[0]).sum() + (final * cotangents[1]).sum()).backward()
    got = {"out": out.float(), "final_state": final}
    got.update({f"d{name}": t.grad.float() for name, t in leaves.items() if t is not None})
    return got


def compare(got: dict, want: dict, where: str, **tol) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], **tol, msg=lambda m: f"{name} {where}: {m}")


def cotangents(inputs: dict, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    b, s, h, d_k = inputs["q"].shape
    d_v = inputs["v"].shape[-1]
    return torch.randn(b, s, h, d_v, generator=gen).to(DEVICE), torch.randn(b, h, d_k, d_v, generator=gen).to(DEVICE)


KINDS = ["plain", "fixed", "gated"]
STATE_RESETS = [(False, False), (True, False), (False, True), (True, True)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("chunk_size", [7, 16, 45])
@pytest.mark.parametrize("with_state, with_resets", STATE_RESETS)
def test_chunked_equals_recurrent(kind, chunk_size, with_state, with_resets):
    gen = torch.Generator().manual_seed(3)
    inputs = make_inputs(kind, 45, 8, 6, with_state, with_resets, gen)
    cot = cotangents(inputs, gen)
    want = run(partial(linear_attention_reference, scale=0.5), inputs, torch.float32, cot)
    got = run(partial(linear_attention_chunked, scale=0.5, chunk_size=chunk_size), inputs, torch.float32, cot)
    compare(got, want, f"kind={kind} chunk={chunk_size} state={with_state} resets={with_resets}", **FP32)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("with_state, with_resets", STATE_RESETS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_equals_recurrent(kind, with_state, with_resets, dtype):
    gen = torch.Generator().manual_seed(5)
    # s=37: three 16-token chunks under the interpreter, the last ragged; d_k=20 spans two 16-wide blocks
    inputs = make_inputs(kind, 37, 20, 12, with_state, with_resets, gen)
    # the reference sees the values the kernels see
    inputs.update({name: inputs[name].to(dtype).float() for name in ("q", "k", "v")})
    cot = cotangents(inputs, gen)
    want = run(partial(linear_attention_reference, scale=0.5), inputs, torch.float32, cot)
    got = run(partial(linear_attention, scale=0.5, impl="triton"), inputs, dtype, cot)
    where = f"kind={kind} state={with_state} resets={with_resets} {dtype}"
    if dtype == torch.float32:
        compare(got, want, where, **FP32)
        return
    # bf16: the kernels round the state and the within-chunk weights to bf16 before their dots (as
    # tensor cores take them) and round the output: 2^-8 relative per rounding; seen up to 7e-3 of
    # the largest entry, so 2e-2 of it (and 2e-2 relative) still fails a dropped or doubled term.
    for name in want:
        tol = dict(rtol=2e-2, atol=2e-2 * want[name].abs().max().item())
        torch.testing.assert_close(got[name], want[name], **tol, msg=lambda m: f"{name} {where}: {m}")


def test_triton_with_several_state_blocks_each_way():
    """d_k = 40 and d_v = 36 span three and three 16-wide blocks under the interpreter: the state
    passes and the gradient kernels loop over blocks on both sides of the state."""
    gen = torch.Generator().manual_seed(6)
    inputs = make_inputs("gated", 37, 40, 36, with_state=True, with_resets=True, gen=gen)
    cot = cotangents(inputs, gen)
    want = run(partial(linear_attention_reference, scale=0.5), inputs, torch.float32, cot)
    got = run(partial(linear_attention, scale=0.5, impl="triton"), inputs, torch.float32, cot)
    compare(got, want, "d_k=40 d_v=36", **FP32)


def test_reset_equals_running_documents_separately():
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 12, 1, 4, generator=gen) for _ in range(3))
    resets = torch.zeros(1, 12, dtype=torch.bool)
    resets[0, 5] = True
    packed, _ = linear_attention_chunked(q, k, v, scale=1.0, chunk_size=4, resets=resets)
    first, _ = linear_attention_reference(q[:, :5], k[:, :5], v[:, :5], scale=1.0)
    second, _ = linear_attention_reference(q[:, 5:], k[:, 5:], v[:, 5:], scale=1.0)
    torch.testing.assert_close(packed, torch.cat([first, second], dim=1), rtol=1e-5, atol=1e-5)


def test_auto_on_cpu_runs_the_chunked_form(monkeypatch):
    dispatch = sys.modules[linear_attention.__module__]  # the package; an attribute of that name may be the function
    calls = []
    monkeypatch.setattr(dispatch, "linear_attention_chunked",
                        lambda *args, **kw: calls.append(1) or linear_attention_chunked(*args, **kw))
    q = torch.randn(1, 5, 2, 4)
    linear_attention(q, q, q, scale=1.0)
    assert calls == [1]


def test_triton_on_cpu_without_the_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q = torch.randn(1, 5, 2, 4)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        linear_attention(q, q, q, scale=1.0, impl="triton")


Q = torch.zeros(2, 5, 3, 4)


@pytest.mark.parametrize("args, kwargs, match", [
    ((Q[0], Q[0], Q[0]), {}, "want q = k"),
    ((Q, Q[:, :4], Q), {}, "want q = k"),
    ((Q, Q, Q[:, :, :2]), {}, "want q = k"),
    ((Q, Q, Q.double()), {}, "q, k, v must share one floating dtype"),
    ((Q, Q, Q, torch.zeros(2)), {}, r"log_decay must be \[h\]"),
    ((Q, Q, Q, torch.zeros(2, 5, 2)), {}, r"log_decay must be \[h\]"),
    ((Q, Q, Q), {"resets": torch.zeros(2, 4, dtype=torch.bool)}, r"resets must be \[b, s\]"),
    ((Q, Q, Q), {"resets": torch.zeros(2, 5)}, r"resets must be \[b, s\]=\(2, 5\) bool"),
    ((Q, Q, Q), {"initial_state": torch.zeros(2, 3, 4, 5)}, r"initial_state must be \[b, h, d_k, d_v\]"),
    ((Q, Q, Q), {"impl": "fla"}, "impl='fla'"),
])
def test_bad_inputs_get_clear_errors(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        linear_attention(*args, scale=1.0, **kwargs)
