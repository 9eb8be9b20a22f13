"""Tracking outages against a real `mlflow server`: training neither fails nor waits while the server
is down, the journal reaches MLflow when it is back (or through `ithaca track-sync`), and every step
is in the MLflow run exactly once, across a crash and its resume.

"Not stalled" is shown by what happened while the server was down (steps went on), not by timing;
the timeouts only catch hangs, and are below the ~4 minutes MLflow's own retries would block a run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from conftest import failure_text, run_cli
from harness import free_port
from mlflow_server import MlflowServer

DOWN = "does not answer ([Errno 111] Connection refused); training goes on"


def train_args(shards: Path, out: Path, uri: str) -> list[str]:
    return ["--config", "debug-cpu", "--set", "parallel.dp=1", "--set", f"data.path={shards}", "--set",
            f"train.output_dir={out}", "--set", "data.seq_len=32", "--set", "train.global_batch=2",
            "--set", "data.workers=0", "--set", "train.log_every=1", "--set", "checkpoint.every=10",
            "--set", f"tracking.uri={uri}", "--set", "tracking.experiment=outage"]


class Output:
    """A process's merged stdout and stderr, read on a thread so that its pipe never fills."""

    def __init__(self, proc: subprocess.Popen):
        self.proc, self.lines = proc, []
        threading.Thread(target=lambda: self.lines.extend(proc.stdout), daemon=True).start()

    def wait_for(self, pattern: str, timeout: float = 180) -> re.Match:
        """The first line from the start matching `pattern`; fails on a hang or if the process ends first."""
        deadline = time.monotonic() + timeout
        while True:
            for line in list(self.lines):
                if found := re.search(pattern, line):
                    return found
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"no line matching {pattern!r}:\n{failure_text(''.join(self.lines))}")
            time.sleep(0.1)

    def last_step(self) -> int:
        return max(int(s) for s in re.findall(r"step=(\d+) loss=", "".join(self.lines)))


def last_system_step(uri: str, run_id: str, beyond: int, timeout: float = 120) -> int:
    """Wait until MLflow's system metrics of the run reach a step after `beyond`; returns the last step."""
    client, deadline = MlflowClient(uri), time.monotonic() + timeout
    while True:
        steps = [m.step for m in client.get_metric_history(run_id, "system/cpu_utilization_percentage")]
        if steps and max(steps) > beyond:
            return max(steps)
        assert time.monotonic() < deadline, f"no system metrics after step {beyond} in {timeout} s"
        time.sleep(0.5)


def the_run(uri: str):
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("outage").experiment_id])
    return client, run


@pytest.fixture
def server(tmp_path) -> MlflowServer:
    """Not started yet: until then its port refuses connections."""
    server = MlflowServer(tmp_path)
    yield server
    server.stop()


def test_a_server_down_mid_run_holds_nothing_up_and_every_step_reaches_it_once(server, debug_shards, tmp_path):
    out = tmp_path / "run"
    server.start()
    # Both sessions on one long schedule (the first is killed, the resume stops early): the replay is bit for bit.
    args = [*train_args(debug_shards, out, server.url), "--set", "optim.decay_steps=100000"]
    env = {**os.environ, "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"}
    first = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                              "-m", "ithaca", "train", *args, "--set", "train.steps=100000"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    output = Output(first)
    try:
        run_id = output.wait_for(r"is MLflow run (\w+)").group(1)
        sampled = last_system_step(server.url, run_id, beyond=-1)  # MLflow's monitor runs while the server answers
        output.wait_for(r"step=5 loss=")
        server.stop()
        down_at = output.last_step()
        output.wait_for(re.escape(DOWN))
        output.wait_for(rf"step={down_at + 20} loss=")  # training went on while the server was down
        server.start()
        output.wait_for(r"answers again; the journaled records are pushed")
        last_system_step(server.url, run_id, beyond=sampled)  # and runs again after the outage
        back_at = output.last_step()
        output.wait_for(rf"step={back_at + 3} loss=")
        (rank,) = psutil.Process(first.pid).children()
        rank.kill()  # a crash: steps after the last checkpoint were logged and will be replayed
        first.wait(timeout=60)
    finally:
        if first.poll() is None:  # the test failed before the crash it causes
            for process in [*psutil.Process(first.pid).children(recursive=True), first]:
                process.kill()
    text = "".join(output.lines)
    assert text.count("does not answer") == 1, failure_text(text)
    crashed_at = output.last_step()
    end = crashed_at + 15

    resumed = run_cli("train", *args, "--nproc", "1", "--resume", "--set", f"train.steps={end}", timeout=300)
    assert resumed.returncode == 0, failure_text(resumed.stderr)
    replay = re.search(r"has steps up to (\d+) in its journal; the replay of those after the checkpoint is not "
                       r"logged again", resumed.stderr)
    resumed_from = int(re.search(r"resumed from \S+ at step=(\d+)", resumed.stderr).group(1))
    # Steps take ~12 ms, so the kill lands anywhere: usually after steps the checkpoint lacks (a replay to
    # dedupe), sometimes right after a checkpoint (nothing to replay). Either way each step is logged once, below.
    assert replay and int(replay.group(1)) >= resumed_from, failure_text(resumed.stderr)

    client, run = the_run(server.url)
    assert run.info.status == "FINISHED"
    for metric in ("loss", "lr", "tokens_per_s"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, metric)] == list(range(1, end + 1))
    assert run.data.params["train.steps"] == "100000"
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["config.yaml"]


def test_a_run_whose_server_never_answers_finishes_and_track_sync_pushes_it_once(server, debug_shards, tmp_path):
    out = tmp_path / "run"
    done = run_cli("train", *train_args(debug_shards, out, server.url), "--nproc", "1", "--set", "train.steps=20",
                   "--set", "tracking.flush_timeout=2", timeout=180)
    assert done.returncode == 0, failure_text(done.stderr)
    assert done.stderr.count("does not answer") == 1 and DOWN in done.stderr
    assert f"push them with `ithaca track-sync {out}`" in done.stderr

    server.start()
    pushed = run_cli("track-sync", str(out), timeout=120)
    again = run_cli("track-sync", str(out), timeout=120)
    assert pushed.returncode == 0 and again.returncode == 0, pushed.stderr + again.stderr
    assert re.search(r"^run \w+: pushed 24 records \(MLflow run \w+ at ", pushed.stdout, re.M), pushed.stdout
    assert re.search(r"^run \w+: nothing left to push", again.stdout, re.M), again.stdout
    client, run = the_run(server.url)
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == list(range(1, 21))
    assert run.data.params["tracking.flush_timeout"] == "2.0"
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["config.yaml"]


def test_track_sync_refuses_a_folder_without_a_journal(tmp_path):
    done = run_cli("track-sync", str(tmp_path), "--uri", f"http://127.0.0.1:{free_port()}")
    assert done.returncode == 1
    assert done.stderr == f"ithaca: {tmp_path}: no tracking journal in {tmp_path / 'tracking'}; give a run's " \
                          "train.output_dir\n"
