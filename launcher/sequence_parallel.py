"""Wiring the sequence split to the mesh: which attention each layer kind gets, and which tokens each rank holds."""

from __future__ import annotations

from functools import partial

import torch

from ithaca.data.packing import document_ids, document_positions, document_starts
from ithaca.kernels import attention, linear_attention
from ithaca.models.linear_attention import AttendLinear
from ithaca.models.llama_args import KernelChoice
from ithaca.models.llama import Attend
from ithaca.parallel.allgather_kv import allgather_kv_attention
from ithaca.parallel.lasp2 import lasp2_attention
from ithaca.parallel.mesh import ParallelMesh
from ithaca.parallel.ring import ring_attention
from ithaca.parallel.sequence_layout import sequence_part
from ithaca.parallel.ulysses import ulysses_attention
from ithaca.parallel.usp import usp_attention


def make_attend(mesh: ParallelMesh, sp_method: str, kernels: KernelChoice = "auto") -> Attend:
    """Causal softmax attention for this mesh: local, or split over sp by `sp_method`; `kernels`
    (model.kernels) picks the attention kernel."""
    if mesh.sp == 1:
        return partial(attention, is_causal=True, impl=kernels)
    if sp_method == "ulysses":
        return partial(ulysses_attention, group=mesh.group("sp"), causal=True, impl=kernels)
    if sp_method == "ring":
        return partial(ring_attention, group=mesh.group("ring"), causal=True, impl=kernels)
    if sp_method == "usp":
        return partial(usp_attention, ulysses_group=mesh.group("ulysses"), ring_group=mesh.group("ring"), causal=True,
                       impl=kernels)
    return partial(allgather_kv_attention, group=mesh.group("sp"), causal=True, ring=mesh.ring, impl=kernels)


def make_attend_linear(mesh: ParallelMesh, kernels: KernelChoice = "auto") -> AttendLinear:
    """Linear attention: the local chunked form, or LASP-2 over the sp group in the mesh's layout."""
    if mesh.sp == 1:
        return lambda q, k, v, log_decay, resets: linear_attention(
            q, k, v, log_decay, scale=q.shape[-1] ** -0.5, resets=resets, impl=kernels)[0]
    return partial(lasp2_attention, group=mesh.group("sp"), ring=mesh.ring, impl=kernels)


def sequence_slice(window: torch.Tensor, mesh: ParallelMesh, eos_id: int | None) -> list[torch.Tensor | None]:
    """A window [b, L+1] -> this sp rank's [tokens, labels, positions, doc_ids, resets], each
    [b, L/sp], in the layout its attention expects (parallel/sequence_layout.py).

    Labels are shifted on the whole window before the split, so the label at each part's edge is kept.
    With `eos_id`, documents are found on the whole window too: doc_ids mark them, resets their
    first tokens, and positions restart at each; without it those two are None and positions
    run 0..L-1.
    """
    tokens, labels = window[:, :-1], window[:, 1:]
    doc_ids = resets = None
    if eos_id is None:
        positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    else:
        doc_ids = document_ids(tokens, eos_id)
        positions, resets = document_positions(doc_ids), document_starts(doc_ids)
    return [None if t is None else sequence_part(t, sp_rank=mesh.rank("sp"), sp=mesh.sp, ring=mesh.ring)
            for t in (tokens, labels, positions, doc_ids, resets)]
