"""What checkpoint loading will unpickle: tensors, plain data and DeepSpeed's three state classes, nothing
that runs code of the file's choosing (launcher/checkpoint/format.py). The manifest checks are in
tests/dist/test_checkpoint_integrity.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ithaca.launcher.checkpoint.format import load_weights_only, read_checkpoint_facts
from ithaca.launcher.config.schema import ConfigError
from ithaca.launcher.config.load import load_config


def _touch(marker: Path) -> None:
    marker.write_text("ran")


class _RunsCode:
    """Unpickling this object calls _touch: what a malicious file could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return _touch, (self.marker,)


def test_a_pickled_callable_is_refused_naming_the_file_and_runs_nothing(tmp_path):
    marker, file = tmp_path / "marker", tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.ones(2)}, "extra": _RunsCode(marker)}, file)
    with pytest.raises(ValueError, match=r"mp_rank_00_model_states\.pt: holds a pickled global \(\S*_touch\)"):
        load_weights_only(file)
    assert not marker.exists()


def test_deepspeed_state_classes_and_tensors_load(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    state = {"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum(2), "fragment": fragment_address(numel=4, start=8),
             "flat": [torch.arange(4.0)], "param_shapes": {"w": torch.Size([2, 2])}}
    torch.save(state, tmp_path / "optim_states.pt")
    loaded = load_weights_only(tmp_path / "optim_states.pt", map_location=lambda storage, loc: storage)
    assert loaded["loss_scaler"].cur_scale == 1.0 and loaded["zero_stage"] is ZeroStageEnum.gradients
    assert loaded["fragment"] == fragment_address(numel=4, start=8) and torch.equal(loaded["flat"][0], torch.arange(4.0))


@pytest.mark.parametrize("states_file", ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"])
def test_the_layout_and_shape_facts_are_read_and_a_checkpoint_without_them_is_refused(tmp_path, states_file):
    facts = {"layout": {"dp": 2, "sp": 2}, "model_shape": {"dim": 64}}
    torch.save({"module": {"w": torch.ones(2)}, **facts, "lr": 1.0}, tmp_path / states_file)
    assert read_checkpoint_facts(tmp_path) == facts
    torch.save({"module": {"w": torch.ones(2)}, "layout": facts["layout"]}, tmp_path / states_file)
    with pytest.raises(ValueError, match=rf"{states_file}: its client state has no 'model_shape'; not a checkpoint "
                                         r"saved by `ithaca train`"):
        read_checkpoint_facts(tmp_path)


def test_keep_must_be_at_least_one():
    with pytest.raises(ConfigError, match="checkpoint.keep=0"):
        load_config("debug-cpu", ["checkpoint.keep=0"])
    assert load_config("debug-cpu", ["checkpoint.keep=2"]).checkpoint.keep == 2
