"""The plan against measurement on CPU ranks (bench/plan_check.py at small size): the largest peak of
live tensor bytes over ranks within 10% of the predicted activation and loss terms, and the
sequence-parallel bytes the busiest rank sends equal to the predicted ones."""

from __future__ import annotations

import pytest

from ithaca.bench.plan_check import SMALL, measure, predicted_sp_bytes, predicted_step_bytes

CASES = {
    # LASP-2 state all-gather over the zigzag's two pieces, and ring attention's blocks with document ids
    "LS sp2 ring": SMALL + ["data.seq_len=2048", "model.layer_pattern=LS", "parallel.sp=2", "parallel.sp_method=ring"],
    # K/V all-gather, the delta rule's state scan and its convolution's halo, all sent again when selective
    # checkpointing recomputes the mixers; the D layer recomputes in the room the S layer above it freed
    "DS sp2 allgather scan selective": SMALL + ["data.seq_len=2048", "model.layer_pattern=DS", "parallel.sp=2",
                                                "parallel.sp_method=allgather", "model.linear_sp_exchange=scan",
                                                "model.activation_checkpointing=selective"],
}


@pytest.mark.parametrize("name", list(CASES))
def test_predicted_peak_and_bytes_match_the_measured_ones(name):
    peak, sent = measure(CASES[name])
    assert predicted_step_bytes(CASES[name]) == pytest.approx(peak, rel=0.10)
    assert predicted_sp_bytes(CASES[name]) == sent
