"""A real `mlflow server` on localhost receives a training run's params, metrics and config artifact."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
from mlflow.tracking import MlflowClient

from conftest import run_cli
from harness import free_port


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "artifacts"), "--workers", "1"],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    try:
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"mlflow server did not come up: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server's own workers are in its process group
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_training_run_reaches_the_tracking_server(mlflow_server, debug_shards, tmp_path):
    done = run_cli("train", "--config", "debug-cpu", "--nproc", "1", "--set", "parallel.dp=1",
                   "--set", f"data.path={debug_shards}", "--set", f"train.output_dir={tmp_path / 'run'}",
                   "--set", "train.steps=3", "--set", "data.seq_len=32", "--set", f"tracking.uri={mlflow_server}",
                   "--set", "tracking.experiment=server-test", "--set", "tracking.run_name=three-steps")
    assert done.returncode == 0, done.stderr[-4000:]
    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("server-test")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "three-steps" and run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3]
    assert run.data.params["data.seq_len"] == "32"
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["config.yaml"]
    assert not (tmp_path / "run" / "mlflow").exists()  # nothing went to the local store
