"""A real `mlflow server` on localhost receives a training run's params, metrics and config artifact."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from conftest import failure_text, run_cli
from mlflow_server import MlflowServer


@pytest.fixture
def mlflow_server(tmp_path):
    server = MlflowServer(tmp_path)
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


def test_training_run_reaches_the_tracking_server(mlflow_server, debug_shards, tmp_path):
    done = run_cli("train", "--config", "debug-cpu", "--nproc", "1", "--set", "parallel.dp=1",
                   "--set", f"data.path={debug_shards}", "--set", f"train.output_dir={tmp_path / 'run'}",
                   "--set", "train.steps=3", "--set", "data.seq_len=32", "--set", f"tracking.uri={mlflow_server}",
                   "--set", "tracking.experiment=server-test", "--set", "tracking.run_name=three-steps")
    assert done.returncode == 0, failure_text(done.stderr)
    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("server-test")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "three-steps" and run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3]
    assert run.data.params["data.seq_len"] == "32"
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["config.yaml"]
    assert not (tmp_path / "run" / "mlflow").exists()  # nothing went to the local store
