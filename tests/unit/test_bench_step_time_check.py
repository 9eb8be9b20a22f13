"""The step-time check's reading of step lines and its calibration of a device's efficiency."""

import dataclasses

import pytest

from ithaca.bench.step_time_check import CASES, calibrated, plan_for, step_seconds
from ithaca.launcher.plan.devices import load_device

LOG = """\
2026-12-06 19:00:00 INFO step=1 loss=5.8 lr=1e-4 grad_norm=1.0 tok_s=100 s_step=9.000 peak_mem_gib=1.0
2026-12-06 19:00:01 INFO step=2 loss=5.7 lr=1e-4 grad_norm=1.0 tok_s=100 s_step=1.500 peak_mem_gib=1.0
eval step=2 eval_loss=5.7 eval_ppl=300 eval_s=0.5
2026-12-06 19:00:02 INFO step=3 loss=5.6 lr=1e-4 grad_norm=1.0 tok_s=100 s_step=1.250 peak_mem_gib=1.0
"""


def test_step_lines_after_the_warmup_are_read_in_step_order():
    assert step_seconds(LOG, warmup=1) == [1.5, 1.25]
    assert step_seconds(LOG, warmup=3) == []


def test_the_calibrated_device_predicts_the_measured_step_of_its_case():
    device = load_device("cpu")
    case = next(iter(CASES.values()))
    plan = plan_for(case, device, gpus_per_node=8)
    measured = 3.7 * plan.time.step_s
    fitted = calibrated(device, plan, measured)
    assert fitted.efficiency == pytest.approx(device.efficiency / 3.7)
    assert plan_for(case, fitted, gpus_per_node=8).time.step_s == pytest.approx(measured)


def test_a_step_shorter_than_its_communication_or_faster_than_the_peak_is_refused():
    device = load_device("cpu")
    plan = plan_for(CASES["tp2"], device, gpus_per_node=8)
    with pytest.raises(ValueError, match="exposed communication alone"):
        calibrated(device, plan, plan.time.exposed_comm_s / 2)
    with pytest.raises(ValueError, match="raise bf16_tflops"):
        calibrated(dataclasses.replace(device, efficiency=1.0), plan, plan.time.step_s / 2)
