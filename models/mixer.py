"""What every token mixer is given besides its input: the sequence's positions and documents."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SequenceInfo:
    """Per-token facts of this rank's part of the sequence, shared by every layer."""

    positions: torch.Tensor
    """[b, s] int RoPE positions (they restart at each document when packed)."""
    doc_ids: torch.Tensor | None
    """[b, s] packed-document ids, or None for one sequence per row."""
    resets: torch.Tensor | None
    """[b, s] bool, True where a document starts (found on the whole sequence, before any split)."""
