"""The gated delta rule: the chunked form equals the token recurrence, forward and backward, on
ragged chunks with document resets; the affine pair (A, B) of a run of tokens equals the
recurrence's and composes across parts as sequence parallelism will use it; the dispatch's
choices and errors."""

from __future__ import annotations

import sys
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from ithaca.kernels.delta_rule import delta_rule, delta_rule_transition
from ithaca.kernels.delta_rule.chunked import delta_rule_chunked, delta_rule_transition_chunked
from ithaca.kernels.delta_rule.reference import delta_rule_reference, delta_rule_transition_reference

B, H = 2, 2
# fp32: the chunked form reorders the recurrence's sums and solves T by substitution (seen: ~5e-7
# absolute on entries of size ~1); 1e-4 still fails a dropped beta or decay (errors of size ~1e-1).
FP32 = dict(rtol=1e-4, atol=1e-4)


def make_inputs(s: int, d_k: int, d_v: int, chunk: int, decay: str, with_state: bool, with_resets: bool,
                gen: torch.Generator, long_memory: bool = False) -> dict[str, torch.Tensor | None]:
    """fp32 inputs as Gated DeltaNet feeds them: L2-normalised keys, sigmoid beta, logsigmoid gates.
    Resets (row 0 and row 1 hold different documents): token 0 of row 0, row 1's second chunk
    start, a token inside a chunk of each row, and a few random ones. `long_memory`: beta ~0.1 and
    gates ~0.98, so the transition A of 37 tokens keeps entries ~0.1 (with beta ~0.5 and gates ~0.9
    they fall to ~1e-5, under the tolerance, and a wrong A would pass)."""
    inputs = {"q": torch.randn(B, s, H, d_k, generator=gen),
              "k": F.normalize(torch.randn(B, s, H, d_k, generator=gen), dim=-1),
              "v": torch.randn(B, s, H, d_v, generator=gen),
              "beta": torch.sigmoid(torch.randn(B, s, H, generator=gen) - (2 if long_memory else 0)),
              "log_decay": None, "initial_state": None, "resets": None}
    if decay == "gated":  # gates in (0, 1), mostly near 1 as trained gates are
        inputs["log_decay"] = F.logsigmoid(torch.randn(B, s, H, generator=gen) + (4 if long_memory else 2))
    if decay == "fixed":  # one decay per head
        inputs["log_decay"] = torch.log(1 - 2.0 ** (-3 - torch.arange(H, dtype=torch.float32)))
    if with_state:
        inputs["initial_state"] = torch.randn(B, H, d_k, d_v, generator=gen)
    if with_resets:
        resets = torch.rand(B, s, generator=gen) < 0.08
        resets[0, 0] = True  # the very first token drops the initial state
        resets[0, min(s - 1, chunk + 3)] = True  # inside a chunk (the first, when s <= chunk)
        resets[1, s // 2 if s // 2 % chunk else s // 2 + 1] = True  # inside a chunk
        if chunk < s:
            resets[1, chunk] = True  # on a chunk's first token
        inputs["resets"] = resets
    return inputs


def run(fn, inputs: dict, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """fn(q, k, v, beta, log_decay=, initial_state=, resets=, output_final_state=True), backward
    from random cotangents on out and the final state -> {"out", "final_state", "dq", ...}."""
    leaves = {name: t.clone().requires_grad_() for name, t in inputs.items() if name != "resets" and t is not None}
    out, final = fn(leaves["q"], leaves["k"], leaves["v"], leaves["beta"], log_decay=leaves.get("log_decay"),
                    initial_state=leaves.get("initial_state"), resets=inputs["resets"], output_final_state=True)
    cot_out = torch.randn(out.shape, generator=gen).to(out.device)  # drawn on the CPU: the same on any device
    cot_final = torch.randn(final.shape, generator=gen).to(out.device)
    ((out * cot_out).sum() + (final * cot_final).sum()).backward()
    got = {"out": out, "final_state": final}
    got.update({f"d{name}": t.grad for name, t in leaves.items()})
    return got


def compare(got: dict, want: dict, where: str) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], **FP32, msg=lambda m: f"{name} {where}: {m}")


SHAPES = [(37, 16, 8, 6), (5, 8, 6, 4), (37, 7, 4, 8)]  # (s, chunk, d_k, d_v): ragged last chunks
STATE_RESETS = [(False, False), (True, False), (False, True), (True, True)]


@pytest.mark.parametrize("s, chunk, d_k, d_v", SHAPES)
@pytest.mark.parametrize("decay", ["none", "gated", "fixed"])
@pytest.mark.parametrize("with_state, with_resets", STATE_RESETS)
def test_chunked_equals_recurrence(s, chunk, d_k, d_v, decay, with_state, with_resets):
    inputs = make_inputs(s, d_k, d_v, chunk, decay, with_state, with_resets, torch.Generator().manual_seed(3))
    want = run(delta_rule_reference, inputs, torch.Generator().manual_seed(4))
    got = run(partial(delta_rule_chunked, chunk_size=chunk), inputs, torch.Generator().manual_seed(4))
    compare(got, want, f"s={s} chunk={chunk} decay={decay} state={with_state} resets={with_resets}")


def test_reset_equals_running_documents_separately():
    gen = torch.Generator().manual_seed(5)
    x = make_inputs(12, 4, 3, 4, "gated", False, False, gen)
    resets = torch.zeros(B, 12, dtype=torch.bool)
    resets[:, 5] = True
    packed, _ = delta_rule_chunked(x["q"], x["k"], x["v"], x["beta"], log_decay=x["log_decay"], resets=resets,
                                   chunk_size=4)
    first, second = ({name: x[name][:, part] for name in ("q", "k", "v", "beta", "log_decay")}
                     for part in (slice(0, 5), slice(5, 12)))
    want = torch.cat([delta_rule_reference(**first)[0], delta_rule_reference(**second)[0]], dim=1)
    torch.testing.assert_close(packed, want, **FP32)


def run_transition(fn, inputs: dict, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """fn(k, v, beta, log_decay=, resets=) -> (A, B), backward from random cotangents on both."""
    leaves = {name: inputs[name].clone().requires_grad_() for name in ("k", "v", "beta", "log_decay")
              if inputs[name] is not None}
    a, b = fn(leaves["k"], leaves["v"], leaves["beta"], log_decay=leaves.get("log_decay"), resets=inputs["resets"])
    cot_a, cot_b = torch.randn(a.shape, generator=gen).to(a.device), torch.randn(b.shape, generator=gen).to(a.device)
    ((a * cot_a).sum() + (b * cot_b).sum()).backward()
    return {"A": a, "B": b, **{f"d{name}": t.grad for name, t in leaves.items()}}


@pytest.mark.parametrize("s, chunk, d_k, d_v", SHAPES)
@pytest.mark.parametrize("decay", ["none", "gated"])
@pytest.mark.parametrize("with_resets", [False, True])
def test_chunked_transition_equals_the_product_of_steps(s, chunk, d_k, d_v, decay, with_resets):
    inputs = make_inputs(s, d_k, d_v, chunk, decay, False, with_resets, torch.Generator().manual_seed(6),
                         long_memory=True)
    want = run_transition(delta_rule_transition_reference, inputs, torch.Generator().manual_seed(7))
    got = run_transition(partial(delta_rule_transition_chunked, chunk_size=chunk), inputs,
                         torch.Generator().manual_seed(7))
    compare(got, want, f"s={s} chunk={chunk} decay={decay} resets={with_resets}")
    if with_resets:  # every row resets somewhere: the state received cannot reach the end
        assert torch.equal(got["A"], torch.zeros_like(got["A"]))
    else:  # else A is large enough that the tolerance above tests it
        assert got["A"].abs().amax(dim=(-2, -1)).min() > 0.05


def split_run(inputs: dict, cut: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two sequence parts as two ranks would run them: part 1's (A, B) carries the initial state to
    part 2's start, which runs from there -> (out [b, s, h, d_v], final state)."""
    def part(name: str, where: slice) -> torch.Tensor | None:
        return None if inputs[name] is None else inputs[name][:, where]

    first, second = slice(0, cut), slice(cut, None)
    a1, b1 = delta_rule_transition_chunked(part("k", first), part("v", first), part("beta", first),
                                           log_decay=part("log_decay", first), resets=part("resets", first),
                                           chunk_size=chunk)
    a2, b2 = delta_rule_transition_chunked(part("k", second), part("v", second), part("beta", second),
                                           log_decay=part("log_decay", second), resets=part("resets", second),
                                           chunk_size=chunk)
    s0 = inputs["initial_state"]
    into_second = a1 @ s0 + b1
    outs, final = [], a2 @ into_second + b2  # the composition (A2 A1, A2 B1 + B2) applied to s0
    for where, state in ((first, s0), (second, into_second)):
        outs.append(delta_rule_chunked(part("q", where), part("k", where), part("v", where), part("beta", where),
                                       log_decay=part("log_decay", where), resets=part("resets", where),
                                       initial_state=state, chunk_size=chunk)[0])
    return torch.cat(outs, dim=1), final


@pytest.mark.parametrize("cut", [16, 21])  # on a chunk edge, inside a chunk
@pytest.mark.parametrize("decay", ["none", "gated"])
@pytest.mark.parametrize("reset_in_second", [False, True])
def test_affine_pairs_compose_to_the_whole_sequence(cut, decay, reset_in_second):
    """What the all-gather exchange relies on: the pairs of two parts, composed in order, carry the
    initial state through the whole sequence; outputs and every gradient match one process."""
    inputs = make_inputs(37, 8, 6, 16, decay, True, False, torch.Generator().manual_seed(8), long_memory=True)
    resets = torch.zeros(B, 37, dtype=torch.bool)
    resets[0, 9] = True  # part 1 of row 0 holds a document start, row 1's does not
    if reset_in_second:
        resets[:, cut + 5] = True
    inputs["resets"] = resets
    want = run(delta_rule_reference, inputs, torch.Generator().manual_seed(9))
    got = run(lambda q, k, v, beta, **kw: split_run({"q": q, "k": k, "v": v, "beta": beta, **kw}, cut, 16),
              inputs, torch.Generator().manual_seed(9))
    compare(got, want, f"cut={cut} decay={decay} reset_in_second={reset_in_second}")


def test_a_reset_makes_the_transition_exactly_zero_and_forgets_what_came_before():
    inputs = make_inputs(37, 8, 6, 16, "gated", True, False, torch.Generator().manual_seed(10), long_memory=True)
    resets = torch.zeros(B, 37, dtype=torch.bool)
    resets[:, 30] = True
    a, b = delta_rule_transition_chunked(inputs["k"], inputs["v"], inputs["beta"], log_decay=inputs["log_decay"],
                                         resets=resets, chunk_size=16)
    assert torch.equal(a, torch.zeros_like(a))  # no rounding: the state received is masked out
    after = {name: inputs[name][:, 30:] for name in ("k", "v", "beta", "log_decay")}
    _, from_reset = delta_rule_transition_reference(**after)  # the last document alone, from zero
    torch.testing.assert_close(b, from_reset, **FP32)



def test_dispatch_auto_runs_chunked_and_reference_on_request(monkeypatch):
    dispatch = sys.modules[delta_rule.__module__]
    calls = []
    monkeypatch.setattr(dispatch, "delta_rule_chunked",
                        lambda *a, **kw: calls.append(kw) or delta_rule_chunked(*a, **kw))
    x = make_inputs(9, 4, 3, 4, "gated", True, True, torch.Generator().manual_seed(11))
    kwargs = dict(log_decay=x["log_decay"], resets=x["resets"], initial_state=x["initial_state"])
    out, final = delta_rule(x["q"], x["k"], x["v"], x["beta"], **kwargs)
    assert len(calls) == 1 and final is None  # final state only when asked for
    want, want_final = delta_rule(x["q"], x["k"], x["v"], x["beta"], **kwargs, output_final_state=True,
                                  impl="reference")
    torch.testing.assert_close(out, want, **FP32)
    assert want_final.shape == (B, H, 4, 3)
    assert out.dtype == x["q"].dtype
    a, b = delta_rule_transition(x["k"], x["v"], x["beta"], log_decay=x["log_decay"])
    a_ref, b_ref = delta_rule_transition(x["k"], x["v"], x["beta"], log_decay=x["log_decay"], impl="reference")
    torch.testing.assert_close((a, b), (a_ref, b_ref), **FP32)


def test_default_scale_is_inverse_sqrt_d_k():
    x = make_inputs(6, 9, 3, 4, "none", False, False, torch.Generator().manual_seed(12))
    default, _ = delta_rule(x["q"], x["k"], x["v"], x["beta"], impl="reference")
    explicit, _ = delta_rule(x["q"], x["k"], x["v"], x["beta"], scale=1 / 3, impl="reference")
    torch.testing.assert_close(default, explicit, rtol=0, atol=0)


Q = torch.zeros(2, 5, 3, 4)
BETA = torch.zeros(2, 5, 3)


@pytest.mark.parametrize("args, kwargs, match", [
    ((Q, Q[:, :4], Q, BETA), {}, "delta_rule: want q = k"),
    ((Q, Q, Q, BETA[:, :4]), {}, r"beta must be \[b, s, h\]=\(2, 5, 3\)"),
    ((Q, Q, Q, BETA.long()), {}, "beta must be .* floating"),
    ((Q, Q, Q, BETA), {"log_decay": torch.zeros(2, 5, 2)}, r"log_decay must be \[h\]"),
    ((Q, Q, Q, BETA), {"resets": torch.zeros(2, 5)}, r"resets must be \[b, s\]=\(2, 5\) bool"),
    ((Q, Q, Q, BETA), {"initial_state": torch.zeros(2, 3, 4, 5)}, r"initial_state must be \[b, h, d_k, d_v\]"),
    ((Q, Q, Q, BETA), {"impl": "fla"}, "impl='fla'"),
])
def test_bad_inputs_get_clear_errors(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        delta_rule(*args, **kwargs)


def test_transition_bad_inputs_get_clear_errors():
    with pytest.raises(ValueError, match=r"delta_rule_transition: beta must be"):
        delta_rule_transition(Q, Q, BETA[:, :4])
    with pytest.raises(ValueError, match="chunk_size=0"):
        delta_rule_transition_chunked(Q, Q, BETA, chunk_size=0)
