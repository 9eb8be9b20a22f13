"""Which layout switches a resume refuses (the switches that work are tests/dist/test_resharded_resume.py)."""

from __future__ import annotations

import dataclasses

import pytest

from ithaca.launcher.checkpoint.reshard import CheckpointLayout, check_reshardable

TP2_BF16 = CheckpointLayout(dp=1, tp=2, pp=1, sp=1, sp_method="ulysses", zero_stage=1, precision="bf16")


def test_bf16_without_zero_is_refused_naming_the_field():
    check_reshardable(TP2_BF16, dataclasses.replace(TP2_BF16, tp=1, sp=2))  # bf16 under ZeRO-1: convertible
    with pytest.raises(ValueError, match=r"^train\.zero_stage=0: this run is bf16 without ZeRO"):
        check_reshardable(TP2_BF16, dataclasses.replace(TP2_BF16, zero_stage=0))
    with pytest.raises(ValueError, match=r"^train\.zero_stage=0: the checkpoint is bf16 without ZeRO"):
        check_reshardable(dataclasses.replace(TP2_BF16, zero_stage=0), TP2_BF16)
