"""A training micro-batch: the five per-token tensors every layer reads, in one order everywhere.

    batch = Batch.from_window(window, eos_id)              # [b, L+1] packed tokens -> [b, L] fields
    piece = batch.part(mesh.sequence, mesh.rank("sp"))      # this sp rank's [b, L/sp] piece
    losses = model(piece.to(device))                        # Llama.forward(batch) -> [b, L/sp] losses

The order is tokens, labels, positions, doc_ids, resets: the dataclass's fields, the pipeline's
tuple (`to_tuple`, `pipeline_inputs`) and every loop over the fields (`fields`).

Labels are the window shifted by one, taken on the whole window before any split, so the label
at each piece's edge is kept (DESIGN.md, "Loss and counts under SP"). Documents are found on the
whole window too (data/packing.py): with an EOS id, doc_ids number them, resets mark their first
tokens and positions restart at each (DESIGN.md, "Packed documents"); without one (document
masking off, `data.document_mask: false`) there are no doc_ids or resets and positions run 0..L-1.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ithaca.data.packing import document_ids, document_positions, document_starts

if TYPE_CHECKING:
    from ithaca.parallel.sequence_layout import SequenceLayout


@dataclass(frozen=True)
class Batch:
    """One micro-batch, whole or one sp rank's piece; every field is [b, s] on one device.

    Raises ValueError if doc_ids and resets are not both given or both None.
    """

    tokens: torch.Tensor
    """int64 input ids."""
    labels: torch.Tensor
    """int64 next-token targets; < 0 means no target (not counted in the loss or its token count)."""
    positions: torch.Tensor
    """int64 RoPE positions: restarted at each document when packed, else 0..L-1."""
    doc_ids: torch.Tensor | None = None
    """int64 packed-document ids, or None: one sequence per row (document masking off)."""
    resets: torch.Tensor | None = None
    """bool, True at each document's first token after the window's first (found on the whole
    window): linear attention drops its state there. None exactly when doc_ids is None."""

    def __post_init__(self) -> None:
        if (self.doc_ids is None) != (self.resets is None):
            raise ValueError(f"Batch: doc_ids is {'None' if self.doc_ids is None else 'given'} and resets "
                             f"{'None' if self.resets is None else 'given'}; give both (packed documents) or neither")

    @classmethod
    def from_window(cls, window: torch.Tensor, eos_id: int | None) -> Batch:
        """A packed window [b, L+1] (the loader's) -> the batch of its L inputs and their next tokens.

        `eos_id` (the tokenizer's end of document, `PackedLoader.eos_id`) turns on document masking;
        None leaves it off. Raises ValueError unless `window` is [b, L+1] with L >= 1.
        """
        if window.dim() != 2 or window.shape[1] < 2:
            raise ValueError(f"Batch.from_window: window {tuple(window.shape)} must be [b, L+1] with L >= 1")
        tokens, labels = window[:, :-1], window[:, 1:]
        if eos_id is None:
            return cls(tokens=tokens, labels=labels,
                       positions=torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens))
        doc_ids = document_ids(tokens, eos_id)
        return cls(tokens=tokens, labels=labels, positions=document_positions(doc_ids), doc_ids=doc_ids,
                   resets=document_starts(doc_ids))

    def fields(self) -> tuple[torch.Tensor | None, ...]:
        """(tokens, labels, positions, doc_ids, resets), None where absent."""
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))

    @property
    def real_tokens(self) -> int:
        """Tokens with a target (labels >= 0): what the loss is divided by, summed over the global batch."""
        return int((self.labels >= 0).sum())

    def part(self, layout: SequenceLayout, sp_rank: int) -> Batch:
        """Rank `sp_rank`'s piece of every field along the sequence, in the order its attention expects
        (`layout.part`: contiguous, zigzag or both). Raises ValueError if L does not split into the
        layout's chunks."""
        return Batch(*(None if t is None else layout.part(t, sp_rank=sp_rank) for t in self.fields()))

    def to(self, device: torch.device | str) -> Batch:
        """Every field on `device`."""
        return Batch(*(None if t is None else t.to(device) for t in self.fields()))

    def to_tuple(self) -> tuple[torch.Tensor, ...]:
        """(tokens, labels, positions[, doc_ids, resets]) with resets as uint8: DeepSpeed's pipeline
        sends tensors between stages, and its p2p sends no bool over gloo. `from_tuple` inverts it."""
        if self.doc_ids is None:
            return self.tokens, self.labels, self.positions
        return self.tokens, self.labels, self.positions, self.doc_ids, self.resets.to(torch.uint8)

    @classmethod
    def from_tuple(cls, items: tuple[torch.Tensor, ...] | list[torch.Tensor]) -> Batch:
        """`to_tuple`'s inverse (resets back to bool)."""
        tokens, labels, positions, *docs = items
        if not docs:
            return cls(tokens=tokens, labels=labels, positions=positions)
        doc_ids, resets = docs
        return cls(tokens=tokens, labels=labels, positions=positions, doc_ids=doc_ids, resets=resets.bool())

    def pipeline_inputs(self) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """The micro-batch as DeepSpeed's pipeline engine loads it: (the first stage's inputs, the
        last stage's labels)."""
        return self.to_tuple(), self.labels
