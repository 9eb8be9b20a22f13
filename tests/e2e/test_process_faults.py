"""Faults injected for real into `ithaca train` (2 CPU ranks under the torchrun it starts):
signals to the command and to torchrun, a rank killed outright (with and without restarts), a
rank that hangs. Each checks the outcome: the exit, the message, the checkpoint, the curve, and
that no process of the run is left (the pids seen while it ran, loader workers included)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient
from conftest import failure_text

FAULT = "ITHACA_TEST_FAULT"


def _args(shards: Path, out: Path, *extra: str) -> list[str]:
    sets = [f"data.path={shards}", f"train.output_dir={out}", "train.log_every=1", "data.seq_len=64",
            "train.global_batch=4", "checkpoint.every=2", "optim.decay_steps=10", *extra]
    return ["train", "--config", "debug-cpu", "--nproc", "2", *(a for s in sets for a in ("--set", s))]


class Run:
    """`ithaca train` started as a user's shell would (its own process group, like a terminal job)."""

    def __init__(self, shards: Path, out: Path, *extra: str, launcher: tuple[str, ...] = (), env: dict | None = None):
        self.log = out.with_suffix(".log")
        self.process = subprocess.Popen([sys.executable, "-m", "ithaca", *_args(shards, out, *extra), *launcher],
                                        stdout=open(self.log, "w"), stderr=subprocess.STDOUT, start_new_session=True,
                                        env={**os.environ, **(env or {})})
        self.seen: set[int] = set()

    def output(self) -> str:
        return self.log.read_text()

    def wait_for(self, pattern: str, timeout: float = 240) -> re.Match:
        """Poll the log for `pattern`, recording the run's processes on the way."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._record_processes()
            if found := re.search(pattern, self.output()):
                return found
            assert self.process.poll() is None, f"exited {self.process.returncode} before {pattern!r}:\n{failure_text(self.output())}"
            time.sleep(0.2)
        raise AssertionError(f"no {pattern!r} in {timeout} s:\n{failure_text(self.output())}")

    def _record_processes(self) -> None:
        try:
            self.seen |= {p.pid for p in psutil.Process(self.process.pid).children(recursive=True)}
        except psutil.NoSuchProcess:
            pass

    def pid_of(self, module: str) -> int:
        (found,) = [p.pid for p in psutil.Process(self.process.pid).children(recursive=True)
                    if module in " ".join(p.cmdline())]
        return found

    def finish(self, timeout: float) -> tuple[int, float]:
        """(exit code, seconds it took)."""
        start = time.monotonic()
        code = self.process.wait(timeout=timeout)
        return code, time.monotonic() - start

    def leftovers(self, within: float = 15) -> list[int]:
        """The run's processes still alive `within` s after the command returned (init reaps them)."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            alive = [pid for pid in self.seen if psutil.pid_exists(pid)
                     and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
            if not alive:
                return []
            time.sleep(0.2)
        return alive


def _stopped_step(output: str, signame: str) -> int:
    return int(re.search(rf"stopped by {signame} at step=(\d+) after its checkpoint", output).group(1))


def test_ctrl_c_checkpoints_every_rank_and_leaves_no_process(debug_shards, tmp_path):
    run = Run(debug_shards, tmp_path / "run", "train.steps=5000", "checkpoint.every=100000")
    run.wait_for(r"step=3 ")
    os.killpg(run.process.pid, signal.SIGINT)  # what Ctrl-C in the terminal does
    code, _ = run.finish(timeout=120)
    output = run.output()
    stopped = _stopped_step(output, "SIGINT")
    assert code == 130, failure_text(output)
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == f"step_{stopped:08d}"
    assert run.leftovers() == []


def test_a_second_ctrl_c_stops_at_once_without_a_checkpoint(debug_shards, tmp_path):
    # rank 1 hangs at step 4, so no step boundary is ever reached: only the second Ctrl-C ends the run
    run = Run(debug_shards, tmp_path / "run", "train.steps=5000", "checkpoint.every=100000",
              "train.step_timeout=600", env={FAULT: "hang:4:1"})
    run.wait_for(r"step=3 ")
    os.killpg(run.process.pid, signal.SIGINT)
    run.wait_for(r"send it again \(Ctrl-C\) to stop at once")
    os.killpg(run.process.pid, signal.SIGINT)
    code, seconds = run.finish(timeout=60)
    assert code == 130 and seconds < 15, (seconds, failure_text(run.output()))
    assert "stopped at once; the step under way was not saved" in run.output()
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert run.leftovers() == []


def test_torchrun_killed_outright_stops_its_ranks_after_a_checkpoint(debug_shards, tmp_path):
    run = Run(debug_shards, tmp_path / "run", "train.steps=5000", "checkpoint.every=100000")
    run.wait_for(r"step=3 ")
    os.kill(run.pid_of("ithaca.launcher.runtime.torchrun_main"), signal.SIGKILL)
    code, _ = run.finish(timeout=120)
    output = run.output()
    stopped = _stopped_step(output, "SIGTERM")  # the ranks' parent-death signal
    assert code == 128 + signal.SIGKILL and "torchrun was killed by SIGKILL" in output, failure_text(output)
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == f"step_{stopped:08d}"
    assert run.leftovers() == []


def test_the_command_killed_outright_takes_torchrun_and_the_ranks_with_it(debug_shards, tmp_path):
    run = Run(debug_shards, tmp_path / "run", "train.steps=5000", "checkpoint.every=100000")
    run.wait_for(r"step=3 ")
    run._record_processes()
    run.process.kill()
    run.finish(timeout=10)
    assert run.leftovers(within=90) == []  # torchrun's shutdown: each rank checkpoints, then exits
    assert json.loads((tmp_path / "run" / "preempted.json").read_text())["signal"] == "SIGTERM"


def test_a_killed_rank_stops_the_job_naming_it_and_the_checkpoint(debug_shards, tmp_path):
    run = Run(debug_shards, tmp_path / "run", "train.steps=10", env={FAULT: "kill:4:1"})
    code, seconds = run.finish(timeout=240)
    output = run.output()
    assert code == 1, failure_text(output)
    pid = re.search(r"ithaca: rank 1 \(pid (\d+)\) was killed by SIGKILL, and the job stopped; the last complete "
                    r"checkpoint is (\S+); continue from it with --resume auto", output)
    assert pid and Path(pid.group(2)) == tmp_path / "run" / "checkpoints" / "step_00000002", failure_text(output)
    assert run.leftovers() == []


def _loss_curve(out: Path) -> dict[int, list[float]]:
    client = MlflowClient(tracking_uri=f"sqlite:///{out.resolve() / 'mlflow' / 'mlflow.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    curve: dict[int, list[float]] = {}
    for metric in client.get_metric_history(run.info.run_id, "loss"):
        curve.setdefault(metric.step, []).append(metric.value)
    return curve


@pytest.fixture(scope="module")
def uninterrupted(debug_shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("whole") / "run"
    whole = Run(debug_shards, out, "train.steps=10")
    assert whole.finish(timeout=240)[0] == 0, failure_text(whole.output())
    return out


@pytest.mark.parametrize("kill_step, resumed_from", [
    (6, 4),  # step 5 already logged; both ranks restart from step 4's checkpoint
    (2, None),  # before the first checkpoint: both restart from step 0, step 1 already logged
])
def test_a_killed_rank_restarts_on_the_uninterrupted_curve(uninterrupted, debug_shards, tmp_path, kill_step,
                                                           resumed_from):
    run = Run(debug_shards, tmp_path / "run", "train.steps=10", launcher=("--max-restarts", "1"),
              env={FAULT: f"kill:{kill_step}:1"})
    code, _ = run.finish(timeout=300)
    output = run.output()
    assert code == 0, failure_text(output)
    if resumed_from:
        assert "restart 1: resuming from the latest complete checkpoint" in output
        assert re.search(rf"resumed from \S+step_{resumed_from:08d} at step={resumed_from}", output), failure_text(output)
    else:
        assert "resumed from" not in output
    # every step once in the same MLflow run, and the same values as the uninterrupted run
    assert _loss_curve(tmp_path / "run") == _loss_curve(uninterrupted)
    assert run.leftovers() == []


def test_a_hung_rank_is_named_by_the_watchdog_and_the_job_ends(debug_shards, tmp_path):
    run = Run(debug_shards, tmp_path / "run", "train.steps=10", "train.step_timeout=8",
              "train.collective_timeout=300", env={FAULT: "hang:3:1"})
    code, _ = run.finish(timeout=280)  # a hang guard: on a loaded machine the start alone took over 100 s
    output = run.output()
    assert code == 1, failure_text(output)
    # rank 0 waits in the step's first collective; rank 1 (the fault) never reached it
    assert re.search(r"rank 0: step 3 has run \d+ s, over train.step_timeout=8 s; stuck in all_reduce "
                     r"\(torch.distributed\) called from \S+loop.py:\d+ in train_step", output), failure_text(output)
    assert "rank 1: step 3 has run" in output and "faults.py" in output
    assert "hang-rank-00000.txt" in output and (tmp_path / "run" / "hang-rank-00000.txt").is_file()
    beats = [json.loads((tmp_path / "run" / "heartbeat" / f"rank-{r:05d}.json").read_text()) for r in (0, 1)]
    assert [b["step"] for b in beats] == [2, 2]
    assert run.leftovers() == []
