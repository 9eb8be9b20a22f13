"""The gated delta rule's Triton kernels (TRITON_INTERPRET=1 off CUDA) equal the token recurrence,
forward and backward of every input, for the three decay kinds, with initial states, final states
and document resets inside chunks and on chunk edges; the transition pair (A, B) likewise; and the
dispatch's choices and errors for impl="triton".

Interpreter cost: about 2 s per forward and backward at these sizes, so the cases are few and each
covers several things at once (the file's budget is ~40 s on 2 cores)."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

from ithaca.kernels.delta_rule import delta_rule, delta_rule_transition
from ithaca.kernels.delta_rule.chunked import delta_rule_chunked
from ithaca.kernels.delta_rule.reference import delta_rule_reference, delta_rule_transition_reference
from test_delta_rule import compare, run, run_transition

B, H = 2, 2
CHUNK = 16  # the kernels' chunk under the interpreter (triton.py's _blocks)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # Triton compiled on a GPU, interpreted without
# fp32: the kernels reorder the recurrence's sums and solve T by substitution (seen: ~1e-5 absolute
# on gradients of size ~20, ~1e-6 on outputs); 1e-4 still fails a dropped beta, decay or mask
# (errors of size ~1e-1 with these long-memory inputs).
FP32 = dict(rtol=1e-4, atol=1e-4)


def make_inputs(s: int, d_k: int, d_v: int, decay: str, with_state: bool, with_resets: bool,
                gen: torch.Generator) -> dict[str, torch.Tensor | None]:
    """Long-memory inputs as Gated DeltaNet feeds them: L2-normalised keys, beta ~0.1, gates ~0.98,
    so the state carried across chunks (and the initial state) still matters at the end. Resets:
    token 0 of row 0 (drops the initial state), one inside row 0's second chunk, row 1's second
    chunk's first token and its first chunk's last (a one-token document ending a chunk)."""
    inputs = {"q": torch.randn(B, s, H, d_k, generator=gen),
              "k": F.normalize(torch.randn(B, s, H, d_k, generator=gen), dim=-1),
              "v": torch.randn(B, s, H, d_v, generator=gen),
              "beta": torch.sigmoid(torch.randn(B, s, H, generator=gen) - 2),
              "log_decay": None, "initial_state": None, "resets": None}
    if decay == "gated":
        inputs["log_decay"] = F.logsigmoid(torch.randn(B, s, H, generator=gen) + 4)
    if decay == "fixed":  # one decay per head
        inputs["log_decay"] = torch.log(1 - 2.0 ** (-5 - torch.arange(H, dtype=torch.float32)))
    if with_state:
        inputs["initial_state"] = torch.randn(B, H, d_k, d_v, generator=gen)
    if with_resets:
        resets = torch.zeros(B, s, dtype=torch.bool)
        resets[0, 0] = True
        resets[0, min(s - 1, CHUNK + 5)] = True
        if s > CHUNK:
            resets[1, CHUNK - 1] = resets[1, CHUNK] = True
        inputs["resets"] = resets
    return {name: None if t is None else t.to(DEVICE) for name, t in inputs.items()}


def triton_delta_rule(*args, **kwargs):
    return delta_rule(*args, **kwargs, impl="triton")


# (s, d_k, d_v): s=37 is three chunks, the last ragged; d_k=12 and d_v=20 are not powers of two,
# d_v spans two 16-wide blocks; (40, 36) spans a 64-wide key block and three value blocks; s=5 is
# one short chunk.
@pytest.mark.parametrize("s, d_k, d_v, decay, with_state, with_resets", [
    (37, 12, 20, "none", False, False),
    (37, 12, 20, "none", True, True),
    (37, 12, 20, "fixed", True, False),
    (37, 12, 20, "fixed", False, True),
    (37, 12, 20, "gated", True, True),
    (37, 40, 36, "gated", True, True),
    (5, 8, 6, "gated", True, True),
])
def test_triton_equals_recurrence(s, d_k, d_v, decay, with_state, with_resets):
    inputs = make_inputs(s, d_k, d_v, decay, with_state, with_resets, torch.Generator().manual_seed(3))
    want = run(delta_rule_reference, inputs, torch.Generator().manual_seed(4))
    got = run(triton_delta_rule, inputs, torch.Generator().manual_seed(4))
    compare(got, want, f"s={s} d_k={d_k} d_v={d_v} decay={decay} state={with_state} resets={with_resets}")
    if with_state and not with_resets:  # the initial state reaches the end: its gradient tests the carry
        assert want["dinitial_state"].abs().max() > 0.1


@pytest.mark.parametrize("decay, with_resets", [("gated", False), ("none", True)])
def test_triton_transition_equals_the_product_of_steps(decay, with_resets):
    inputs = make_inputs(37, 12, 10, decay, False, with_resets, torch.Generator().manual_seed(6))
    want = run_transition(delta_rule_transition_reference, inputs, torch.Generator().manual_seed(7))
    got = run_transition(lambda *a, **kw: delta_rule_transition(*a, **kw, impl="triton"), inputs,
                         torch.Generator().manual_seed(7))
    compare(got, want, f"decay={decay} resets={with_resets}")
    if with_resets:  # every row resets somewhere: A is exactly zero, no rounding
        assert torch.equal(got["A"], torch.zeros_like(got["A"]))
    else:  # else A is large enough that the tolerance above tests it
        assert got["A"].abs().amax(dim=(-2, -1)).min() > 0.05


def test_triton_final_state_only_when_asked_and_the_default_scale():
    x = make_inputs(9, 9, 4, "gated", True, True, torch.Generator().manual_seed(11))
    kwargs = dict(log_decay=x["log_decay"], resets=x["resets"], initial_state=x["initial_state"])
    out, final = delta_rule(x["q"], x["k"], x["v"], x["beta"], **kwargs, impl="triton")
    assert final is None
    want, _ = delta_rule(x["q"], x["k"], x["v"], x["beta"], **kwargs, scale=1 / 3, impl="reference")
    torch.testing.assert_close(out, want, **FP32)


def test_auto_on_cpu_runs_the_chunked_form(monkeypatch):
    if DEVICE == "cuda":
        pytest.skip("auto picks Triton on CUDA")
    dispatch = sys.modules[delta_rule.__module__]
    calls = []
    monkeypatch.setattr(dispatch, "delta_rule_chunked",
                        lambda *a, **kw: calls.append(1) or delta_rule_chunked(*a, **kw))
    x = make_inputs(5, 4, 3, "none", False, False, torch.Generator().manual_seed(12))
    delta_rule(x["q"], x["k"], x["v"], x["beta"])
    assert calls == [1]


def test_triton_refuses_keys_wider_than_one_block():
    q, beta = torch.zeros(1, 3, 1, 257, device=DEVICE), torch.zeros(1, 3, 1, device=DEVICE)
    with pytest.raises(ValueError, match="d_k=257"):
        delta_rule(q, q, q[..., :4], beta, impl="triton")
    with pytest.raises(ValueError, match="d_k=257"):
        delta_rule_transition(q, q[..., :4], beta, impl="triton")


def test_triton_on_cpu_without_the_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, beta = torch.zeros(1, 3, 1, 4), torch.zeros(1, 3, 1)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        delta_rule(q, q, q, beta, impl="triton")


def test_triton_in_bf16():
    inputs = make_inputs(37, 12, 20, "gated", True, True, torch.Generator().manual_seed(5))
    inputs.update({name: inputs[name].bfloat16().float() for name in ("q", "k", "v")})  # the values the kernels see
    want = run(delta_rule_reference, inputs, torch.Generator().manual_seed(6))
    got = run(triton_delta_rule, {**inputs, **{name: inputs[name].bfloat16() for name in ("q", "k", "v")}},
              torch.Generator().manual_seed(6))
    # bf16: out, dq, dk, dv are rounded to bf16 once (2^-8 relative; seen up to 5e-3 of the largest
    # entry under the interpreter, where the dots are fp32); on a GPU the dots take bf16 operands
    # too. 2e-2 of the largest entry still fails a dropped or doubled term.
    for name in want:
        tol = dict(rtol=2e-2, atol=2e-2 * want[name].abs().max().item())
        torch.testing.assert_close(got[name].float(), want[name], **tol, msg=lambda m: f"{name} bf16: {m}")
