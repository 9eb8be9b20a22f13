"""The typed micro-batch (data/batch.py): built from a packed window, split for a sequence layout,
and the pipeline's tuple."""

from __future__ import annotations

import pytest
import torch

from ithaca.data.batch import Batch
from ithaca.data.packing import document_ids
from ithaca.parallel.sequence_layout import SequenceLayout
from ithaca.parallel.zigzag import zigzag_merge

EOS = 9


def window() -> torch.Tensor:
    """[2, 17]: documents ending in EOS, cut by the window's edges."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randint(0, EOS, (2, 17), generator=gen)
    w[0, [3, 4, 10]] = EOS
    w[1, [15, 16]] = EOS
    return w


def test_labels_are_the_next_tokens_and_documents_are_found_on_the_whole_window():
    w = window()
    b = Batch.from_window(w, EOS)
    assert torch.equal(b.tokens, w[:, :-1]) and torch.equal(b.labels, w[:, 1:])
    assert torch.equal(b.doc_ids, document_ids(w[:, :-1], EOS))
    assert b.doc_ids[0].tolist() == [0] * 4 + [1] + [2] * 6 + [3] * 5
    assert b.positions[0].tolist() == [0, 1, 2, 3, 0, 0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4]
    assert b.resets.dtype == torch.bool and b.resets[0].nonzero().flatten().tolist() == [4, 5, 11]
    assert b.real_tokens == 32


def test_without_an_eos_there_are_no_documents():
    b = Batch.from_window(window(), eos_id=None)
    assert b.doc_ids is None and b.resets is None
    assert torch.equal(b.positions, torch.arange(16).expand(2, 16))
    assert len(b.to_tuple()) == 3


@pytest.mark.parametrize("layout", [SequenceLayout(sp=2), SequenceLayout(sp=4, sp_method="ring"),
                                    SequenceLayout(sp=4, sp_method="usp", ulysses_degree=2)])
def test_the_pieces_of_every_rank_put_back_are_the_whole_batch(layout):
    """Each field is split with the layout's `part`: labels shifted before the split keep the label
    at each piece's edge, and document facts found on the whole window cross the pieces intact."""
    whole = Batch.from_window(window(), EOS)
    pieces = [whole.part(layout, sp_rank=r) for r in range(layout.sp)]
    for name, field in zip(("tokens", "labels", "positions", "doc_ids", "resets"), whole.fields()):
        parts = [getattr(p, name) for p in pieces]
        assert all(t.shape == (2, 16 // layout.sp) for t in parts)
        if layout.ring == 1:
            merged = torch.cat(parts, dim=1)
        else:  # each ring rank's part is its Ulysses ranks' shares, in order
            per_ring = [torch.cat(parts[i:i + layout.ulysses], dim=1) for i in range(0, layout.sp, layout.ulysses)]
            merged = zigzag_merge(per_ring, dim=1)
        assert torch.equal(merged, field), name
    assert sum(p.real_tokens for p in pieces) == whole.real_tokens


def test_the_pipeline_tuple_keeps_the_order_and_sends_resets_as_uint8():
    b = Batch.from_window(window(), EOS)
    inputs, labels = b.pipeline_inputs()
    assert labels is b.labels
    assert [t.dtype for t in inputs] == [torch.int64] * 4 + [torch.uint8]  # gloo's p2p sends no bool
    back = Batch.from_tuple(inputs)
    assert all(torch.equal(x, y) for x, y in zip(back.fields(), b.fields())) and back.resets.dtype == torch.bool
    assert Batch.from_tuple(Batch.from_window(window(), None).to_tuple()).doc_ids is None


def test_to_moves_every_field():
    b = Batch.from_window(window(), EOS).to("meta")
    assert all(t.device.type == "meta" for t in b.fields())


def test_bad_inputs_are_refused_naming_them():
    with pytest.raises(ValueError, match="window"):
        Batch.from_window(torch.zeros(17, dtype=torch.long), EOS)
    w = window()
    with pytest.raises(ValueError, match="doc_ids is given and resets None"):
        Batch(tokens=w[:, :-1], labels=w[:, 1:], positions=w[:, 1:], doc_ids=w[:, :-1])
