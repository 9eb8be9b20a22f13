from __future__ import annotations

import torch

from ithaca.data.packing import document_ids, document_positions, document_starts

EOS = 9


def test_documents_start_after_each_eos_and_positions_restart():
    tokens = torch.tensor([[1, 2, EOS, 3, EOS, 4, 5, 6], [1, 1, 1, 1, 1, 1, 1, EOS]])
    doc = document_ids(tokens, EOS)
    assert doc.tolist() == [[0, 0, 0, 1, 1, 2, 2, 2], [0] * 8]
    assert document_positions(doc).tolist() == [[0, 1, 2, 0, 1, 0, 1, 2], list(range(8))]
    assert document_starts(doc).int().tolist() == [[0, 0, 0, 1, 0, 1, 0, 0], [0] * 8]
