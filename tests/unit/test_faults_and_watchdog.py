"""The pieces of fault handling that need no process group: the test-only fault plan, the
watchdog's account of where a thread waits, the heartbeat file, and the timeouts' config checks.
(The faults themselves are injected for real in tests/e2e/test_process_faults.py.)"""

from __future__ import annotations

import json
import sys
import threading
import time

import pytest

from ithaca.launcher.config.schema import ConfigError, TrainConfig
from ithaca.launcher.runtime.faults import ENV, Fault, planned_fault
from ithaca.launcher.runtime.watchdog import StepWatchdog, where_stuck


def test_the_fault_plan_names_one_rank_and_only_the_first_attempt(monkeypatch):
    monkeypatch.setenv(ENV, "kill:4:1")
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    assert planned_fault(1) == Fault("kill", 4) and planned_fault(0) is None
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # a restarted job goes through
    assert planned_fault(1) is None
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    monkeypatch.setenv(ENV, "explode:4:1")
    with pytest.raises(ValueError, match="the kind is one of kill, hang"):
        planned_fault(1)


def test_a_fault_can_name_a_later_attempt(monkeypatch):
    monkeypatch.setenv(ENV, "stop:7:0:1")
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    assert planned_fault(0) is None  # the first attempt goes through
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert planned_fault(0) == Fault("stop", 7) and planned_fault(1) is None


def _thread_frame(target) -> tuple[threading.Thread, object]:
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    time.sleep(0.2)
    return thread, sys._current_frames()[thread.ident]


def test_where_stuck_names_the_ithaca_line_a_thread_waits_in():
    _, frame = _thread_frame(lambda: Fault("hang", 1).at_step_start(1))  # sleeps forever inside faults.py
    assert "launcher/runtime/faults.py" in where_stuck(frame) and where_stuck(frame).endswith("in at_step_start")


def test_where_stuck_without_an_ithaca_frame_names_the_innermost_one():
    _, frame = _thread_frame(lambda: time.sleep(3600))
    assert "test_faults_and_watchdog.py" in where_stuck(frame)


def test_the_heartbeat_file_holds_the_last_finished_step(tmp_path):
    watchdog = StepWatchdog(tmp_path, rank=3, step_timeout=60)
    try:
        watchdog.begin(7)
        watchdog.end(7)
        beat = json.loads((tmp_path / "heartbeat" / "rank-00003.json").read_text())
        assert beat["step"] == 7 and abs(beat["time"] - time.time()) < 60
    finally:
        watchdog.close()


@pytest.mark.parametrize("field", ["collective_timeout", "step_timeout"])
@pytest.mark.parametrize("value", [0, -1.0, float("nan")])
def test_timeouts_must_be_positive(field, value):
    with pytest.raises(ConfigError, match=f"train.{field}=.*use a number of seconds > 0"):
        TrainConfig(steps=1, **{field: value})
