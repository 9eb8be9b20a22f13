"""Document structure of a packed window: which document each token is in, and its position there.

Documents are packed end to end with EOS after each, so a new document starts right after an EOS
(the first token of a window starts one too: a document cut by the window edge restarts at 0).
"""

from __future__ import annotations

import torch


def document_ids(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """tokens [b, L] -> [b, L] int64 ids, 0 for the window's first document, +1 after each EOS."""
    starts = torch.zeros_like(tokens, dtype=torch.long)
    starts[:, 1:] = tokens[:, :-1] == eos_id
    return starts.cumsum(dim=1)


def document_starts(doc_ids: torch.Tensor) -> torch.Tensor:
    """[b, L] document ids -> [b, L] bool, True where a document begins after the window's first token
    (linear attention drops its state there; the first token has no state before it to drop)."""
    starts = torch.zeros_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return starts


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """[b, L] document ids -> each token's position inside its document (RoPE restarts per document)."""
    index = torch.arange(doc_ids.shape[1], device=doc_ids.device).expand_as(doc_ids)
    start_of_doc = torch.where(document_starts(doc_ids), index, 0).cummax(dim=1).values
    return index - start_of_doc
