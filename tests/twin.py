"""The twin check every sequence-parallel test uses, for any sequence-mixing op.

Twin pattern (STYLE.md, "Tests"): every rank draws the whole inputs from one seed, runs the
single-process reference on the whole sequence and its gradients under a random cotangent, then
runs the parallel function on its own part (split with the helper the code uses) and compares its
part of the output and of every gradient. An input every rank holds whole (a convolution's
weight) gets one share of its gradient on each rank: the shares are summed over the group first.

`check_twin` takes any op: softmax attention (`check_attention_twin` below), LASP-2 linear
attention, the delta rule, the halo convolution.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.distributed as dist

from ithaca.kernels.attention import attention_reference


@dataclass(frozen=True)
class Input:
    """One input of the op, drawn whole on every rank: a standard normal (or uniform) draw of `shape`,
    then `then` (e.g. F.normalize for unit keys, `u < 0.08` for resets), or a fixed `value`."""

    shape: tuple[int, ...]
    """The whole input's shape; dim 1 is the sequence when it is split."""
    is_split: bool = True
    """Split along dim 1 with the layout's `part`; False: every rank holds it whole (a weight, a per-head decay)."""
    has_grad: bool = True
    """A leaf whose gradient is compared; False for ids, masks and constants."""
    draw: Literal["normal", "uniform"] = "normal"
    then: Callable[[torch.Tensor], torch.Tensor] | None = None
    value: torch.Tensor | None = None
    """A fixed tensor instead of a draw (takes nothing from the generator)."""

    @staticmethod
    def constant(value: torch.Tensor, *, is_split: bool = False) -> Input:
        """A fixed input with no gradient: a per-head decay, a hand-made reset pattern."""
        return Input(tuple(value.shape), is_split=is_split, has_grad=False, value=value)

    def make(self, gen: torch.Generator) -> torch.Tensor:
        if self.value is not None:
            x = self.value
        else:
            x = (torch.randn if self.draw == "normal" else torch.rand)(self.shape, generator=gen)
            x = x if self.then is None else self.then(x)
        assert tuple(x.shape) == tuple(self.shape), f"drew {tuple(x.shape)}, declared {self.shape}"
        return x


@dataclass(frozen=True)
class TwinRun:
    """What one parallel function produced on this rank, for checks of the caller's own."""

    out: torch.Tensor
    """This rank's output (detached)."""
    inputs: dict[str, torch.Tensor]
    """The inputs it was given (this rank's parts of the split ones), gradients filled where compared."""


def check_twin(reference: Callable[..., torch.Tensor], parallel: dict[str, Callable[..., torch.Tensor]],
               inputs: dict[str, Input], *, part: Callable[[torch.Tensor], torch.Tensor], seed: int, tol: dict,
               where: str, group: dist.ProcessGroup | None = None) -> dict[str, TwinRun]:
    """Every function in `parallel` must equal `reference` on this rank's part, output and gradients.

    reference(**whole inputs) -> [b, n, ...] and each parallel(**this rank's inputs) -> [b, s, ...]
    take the inputs by name (an op's options go in the callables). Inputs are drawn in the dict's
    order, then the cotangent (the reference output's shape). `part`: a whole-sequence tensor ->
    this rank's part along dim 1, the layout's split (e.g. `partial(sequence_part, sp_rank=r, sp=P,
    ring=ring)`); it splits the split inputs, the output and their gradients. The named parallel
    functions all run against one reference run (their names go into failure messages). `group`:
    the ranks the sequence is split over, needed when an input every rank holds whole has a
    gradient (its shares are summed over it). `tol`: assert_close's rtol/atol, its reason at the
    call site. Returns each function's `TwinRun`.
    """
    if group is None and any(not spec.is_split and spec.has_grad for spec in inputs.values()):
        raise ValueError("check_twin: an input every rank holds whole has a gradient; pass group= to sum its shares")
    gen = torch.Generator().manual_seed(seed)
    whole = {name: spec.make(gen) for name, spec in inputs.items()}
    for name, spec in inputs.items():
        if spec.has_grad:
            whole[name] = whole[name].clone().requires_grad_()
    full = reference(**whole)
    cotangent = torch.randn(full.shape, generator=gen)
    full.backward(cotangent)

    runs = {}
    for variant, fn in parallel.items():
        local = {name: part(whole[name].detach()) if spec.is_split else whole[name].detach()
                 for name, spec in inputs.items()}
        for name, spec in inputs.items():
            if spec.has_grad:  # a copy: a view of `whole` would share its storage and its gradient
                local[name] = local[name].clone().requires_grad_()
        out = fn(**local)
        out.backward(part(cotangent))
        at = f"{variant} {where}"
        torch.testing.assert_close(out, part(full.detach()), **tol, msg=lambda m: f"out {at}: {m}")
        for name, spec in inputs.items():
            if not spec.has_grad:
                continue
            mine = local[name].grad
            assert mine is not None, f"d{name} {at}: no gradient reached this rank's {name}"
            if spec.is_split:
                ref = part(whole[name].grad)
            else:  # this rank's share of a sum over the whole sequence
                mine = mine.clone()
                dist.all_reduce(mine, group=group)
                ref = whole[name].grad
            torch.testing.assert_close(mine, ref, **tol, msg=lambda m: f"d{name} {at}: {m}")
        runs[variant] = TwinRun(out.detach(), local)
    return runs


def doc_ids_of(uniform: torch.Tensor) -> torch.Tensor:
    """[b, n] uniform draws -> ids of packed documents of random lengths (about 7 tokens), crossing chunk edges."""
    starts = uniform < 0.15
    starts[:, 0] = True
    return starts.long().cumsum(1) - 1


def random_doc_ids(b: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """[b, n] ids of packed documents of random lengths (about 7 tokens), crossing chunk edges."""
    return doc_ids_of(torch.rand(b, n, generator=gen))


def check_attention_twin(attend: Callable[..., torch.Tensor], part: Callable[[torch.Tensor], torch.Tensor], *,
                         b: int, n: int, heads: int, kv_heads: int, head_dim: int, causal: bool, packed: bool,
                         seed: int, tol: dict, where: str) -> None:
    """attend(q, k, v, doc_ids) on this rank's part (`part`: whole tensor -> this rank's piece) must
    equal softmax attention's reference on the whole sequence: `check_twin` with q, k, v (and doc ids)."""
    inputs = {"q": Input((b, n, heads, head_dim)), "k": Input((b, n, kv_heads, head_dim)),
              "v": Input((b, n, kv_heads, head_dim))}
    if packed:
        inputs["doc_ids"] = Input((b, n), has_grad=False, draw="uniform", then=doc_ids_of)
    check_twin(lambda q, k, v, doc_ids=None: attention_reference(q, k, v, is_causal=causal, doc_ids=doc_ids),
               {"attention": lambda q, k, v, doc_ids=None: attend(q, k, v, doc_ids)},
               inputs, part=part, seed=seed, tol=tol, where=where)
