"""The fused output projection + cross-entropy, every implementation, against F.cross_entropy on
whole logits: loss and both gradients under a random per-token upstream gradient."""

from __future__ import annotations

import logging
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from harness import run_ranks
from ithaca.kernels import _backend
from ithaca.kernels.linear_cross_entropy import linear_cross_entropy

# fp32: the blocks only reorder sums (~2e-6 seen on values up to 30); 2e-5 still fails on a dropped
# block or a wrong column (errors of order 1e-1).
# bf16: the logits are the same bf16 matmul as the spec's, so the loss agrees to fp32 order; the
# gradients round each block's bf16 product before the fp32 sum, one bf16 step (2^-6 on values in
# [2, 4)) apart from the spec's single matmul.
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}
SMALL_CHUNKS = dict(token_chunk=8, vocab_chunk=16)  # n=37, V=101: 5 x 7 blocks, ragged on both sides
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # Triton compiled on a GPU, interpreted without


def _inputs(n: int, vocab: int, d: int, dtype: torch.dtype, ignore_index: int, seed: int,
            device: str = DEVICE) -> tuple:
    """hidden [n, d], weight [vocab, d], labels [n] with some ignored (all of rows 8..15: a whole
    token chunk), upstream gradient [n] fp32 of random per-token weights, on `device`."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=gen).to(dtype)
    weight = torch.randn(vocab, d, generator=gen).to(dtype)
    labels = torch.randint(0, vocab, (n,), generator=gen)
    labels[torch.rand(n, generator=gen) < 0.2] = ignore_index
    labels[8:16] = ignore_index
    return tuple(t.to(device) for t in (hidden, weight, labels, torch.rand(n, generator=gen)))


def _loss_and_grads(fn, hidden, weight, labels, grad) -> list[torch.Tensor]:
    hidden, weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = fn(hidden, weight, labels)
    loss.backward(grad)
    return [loss, hidden.grad.float(), weight.grad.float()]


def _spec(ignore_index: int):
    return lambda h, w, y: F.cross_entropy((h @ w.T).float(), y, ignore_index=ignore_index, reduction="none")


def _compare(got: list[torch.Tensor], want: list[torch.Tensor], tol: dict, where: str) -> None:
    for name, g, w in zip(("loss", "dhidden", "dweight"), got, want):
        torch.testing.assert_close(g, w, **tol, msg=lambda m: f"{where} {name}: {m}")


@pytest.mark.parametrize("impl", ["reference", "chunked", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_matches_cross_entropy(impl, dtype):
    hidden, weight, labels, grad = _inputs(37, 101, 24, dtype, -100, seed=0)
    got = _loss_and_grads(lambda h, w, y: linear_cross_entropy(h, w, y, impl=impl, **SMALL_CHUNKS),
                          hidden, weight, labels, grad)
    assert got[0].dtype == torch.float32 and got[0][8:16].eq(0).all()
    _compare(got, _loss_and_grads(_spec(-100), hidden, weight, labels, grad), TOL[dtype], impl)


@pytest.mark.parametrize("impl", ["chunked", "triton"])
def test_ignore_index_inside_the_vocabulary(impl):
    """ignore_index=5 is also a real id: its tokens must still get no loss and no gradient."""
    hidden, weight, labels, grad = _inputs(37, 101, 24, torch.float32, 5, seed=1)
    got = _loss_and_grads(lambda h, w, y: linear_cross_entropy(h, w, y, 5, impl=impl, **SMALL_CHUNKS),
                          hidden, weight, labels, grad)
    _compare(got, _loss_and_grads(_spec(5), hidden, weight, labels, grad), TOL[torch.float32], impl)


@pytest.mark.parametrize("impl", ["chunked", "triton"])
def test_mean_loss_and_default_chunks(impl):
    """.mean() hands backward a stride-0 gradient; default chunk sizes make a single block."""
    hidden, weight, labels, _ = _inputs(19, 40, 8, torch.float32, -100, seed=2)
    got = _loss_and_grads(lambda h, w, y: linear_cross_entropy(h, w, y, impl=impl).mean(),
                          hidden, weight, labels, None)
    want = _loss_and_grads(lambda h, w, y: _spec(-100)(h, w, y).mean(), hidden, weight, labels, None)
    _compare(got, want, TOL[torch.float32], impl)


# gloo ranks hold CPU tensors: Triton runs there only interpreted (on a GPU machine the
# single-process tests above run it compiled)
VOCAB_PARALLEL_CASES = [("reference", torch.float32), ("chunked", torch.float32), ("chunked", torch.bfloat16),
                        ("reference", torch.bfloat16)] + (
    [("triton", torch.float32)] if os.environ.get("TRITON_INTERPRET") == "1" else [])


def _vocab_parallel_cases() -> int:
    """On each rank: this rank's shard through every impl equals its part of the whole-weight spec."""
    rank, tp, group = dist.get_rank(), dist.get_world_size(), dist.group.WORLD
    local_vocab = 27  # ragged against vocab_chunk=16
    for i, (impl, dtype) in enumerate(VOCAB_PARALLEL_CASES):
        hidden, weight, labels, grad = _inputs(21, local_vocab * tp, 8, dtype, -100, seed=10 + i, device="cpu")
        rows = slice(rank * local_vocab, (rank + 1) * local_vocab)
        want = _loss_and_grads(_spec(-100), hidden, weight, labels, grad)
        want[2] = want[2][rows]
        got = _loss_and_grads(
            lambda h, w, y: linear_cross_entropy(h, w, y, group=group, impl=impl, token_chunk=8, vocab_chunk=16),
            hidden, weight[rows], labels, grad)
        _compare(got, want, TOL[dtype], f"{impl} {dtype} rank {rank}/{tp}")
    hidden, weight, labels, _ = _inputs(21, local_vocab * tp, 8, torch.float32, -100, seed=0, device="cpu")
    labels[0] = local_vocab * tp  # a global id one past the end: refused; ids past the local shard are fine
    with pytest.raises(ValueError, match="labels"):
        linear_cross_entropy(hidden, weight[:local_vocab], labels, group=group)
    return len(VOCAB_PARALLEL_CASES)


@pytest.mark.parametrize("tp", [2, 4])
def test_vocab_parallel_matches_whole_weight(tp):
    assert run_ranks(_vocab_parallel_cases, tp) == [len(VOCAB_PARALLEL_CASES)] * tp


class _LargestTensor(TorchDispatchMode):
    """Records the most elements any op's output had, and which ops ran."""

    def __init__(self):
        super().__init__()
        self.largest, self.ops = 0, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.add(func.overloadpacket.__name__)
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_chunked_never_makes_whole_logits():
    n, vocab, d = 512, 2048, 16
    hidden, weight, labels, grad = _inputs(n, vocab, d, torch.float32, -100, seed=3)
    seen = {}
    for impl in ("reference", "chunked"):
        with _LargestTensor() as mode:
            _loss_and_grads(lambda h, w, y: linear_cross_entropy(h, w, y, impl=impl, token_chunk=128,
                                                                 vocab_chunk=256), hidden, weight, labels, grad)
        seen[impl] = mode
    assert seen["reference"].largest >= n * vocab  # the mode does see whole logits where they exist
    assert "addmm_" in seen["chunked"].ops  # ... and the backward pass's ops
    assert seen["chunked"].largest <= max(128 * 256, vocab * d), seen["chunked"].largest  # a block, or dweight


def test_auto_is_chunked_off_cuda(monkeypatch):
    monkeypatch.setattr(_backend, "_reported", set())  # choose() logs each (op, impl, why) once per process
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger(_backend.__name__)
    logger.addHandler(handler)
    try:
        hidden, weight, labels, _ = _inputs(19, 40, 8, torch.float32, -100, seed=4, device="cpu")
        linear_cross_entropy(hidden, weight, labels)
    finally:
        logger.removeHandler(handler)
    assert any("linear_cross_entropy: chunked" in line for line in lines), lines


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    hidden, weight, labels, _ = _inputs(19, 40, 8, torch.float32, -100, seed=5, device="cpu")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        linear_cross_entropy(hidden, weight, labels, impl="triton")


def _bad_calls() -> list:
    h, w, y = torch.randn(6, 4), torch.randn(10, 4), torch.randint(0, 10, (6,))
    return [
        ((h[None], w, y), {}, "hidden"),
        ((h, w[:, :3], y), {}, "weight"),
        ((h, w[:0], y), {}, "weight"),
        ((h, w, y[:5]), {}, "labels"),
        ((h, w.bfloat16(), y), {}, "dtype"),
        ((h.half(), w.half(), y), {}, "dtype"),
        ((h, w, y.float()), {}, "labels"),
        ((h, w, torch.tensor([0, 1, 2, 3, 4, 10])), {}, "labels"),
        ((h, w, torch.tensor([0, 1, 2, -1, 4, 5])), {}, "labels"),
        ((h, w, y), dict(vocab_chunk=0), "vocab_chunk"),
        ((h, w, y), dict(impl="fused"), "impl"),
    ]


@pytest.mark.parametrize("args, kwargs, match", _bad_calls())
def test_bad_inputs_raise(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        linear_cross_entropy(*args, **kwargs)
