"""A real `mlflow server` on localhost receives a training run's params, metrics, config artifact and
eval plots, and `ithaca eval --mlflow` of its checkpoint logs into the same run at the checkpoint's step."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from conftest import failure_text, run_cli
from mlflow_server import MlflowServer

HOLDOUT_LINE = "evaluating on the holdout of data.path"


@pytest.fixture
def mlflow_server(tmp_path):
    server = MlflowServer(tmp_path)
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="module")
def held_out_shards(tmp_path_factory):
    """Byte shards of a few standard-library modules, two of them held out for evaluation."""
    from ithaca.data import ByteTokenizer, prep
    from ithaca.data.inputs import default_inputs

    out = tmp_path_factory.mktemp("held") / "shards"
    prep(default_inputs()[:8], out, ByteTokenizer(), shard_tokens=50_000, holdout=2)
    return out


def artifact_bytes(client: MlflowClient, run_id: str, path: str, tmp_path) -> bytes:
    from pathlib import Path

    return Path(client.download_artifacts(run_id, path, str(tmp_path))).read_bytes()


def test_training_run_and_its_eval_reach_the_tracking_server(mlflow_server, held_out_shards, tmp_path):
    out = tmp_path / "run"
    done = run_cli("train", "--config", "debug-cpu", "--nproc", "1", "--set", "parallel.dp=1",
                   "--set", f"data.path={held_out_shards}", "--set", f"train.output_dir={out}",
                   "--set", "train.steps=3", "--set", "data.seq_len=32", "--set", f"tracking.uri={mlflow_server}",
                   "--set", "tracking.experiment=server-test", "--set", "tracking.run_name=three-steps",
                   "--set", "eval.every=3", "--set", "eval.seq_len=128", "--set", "eval.batches=1",
                   "--set", "eval.metrics=[loss,positions,passkey]", "--set", "eval.passkey_samples=1")
    assert done.returncode == 0, failure_text(done.stderr)
    assert done.stderr.count(HOLDOUT_LINE) == 1, failure_text(done.stderr)
    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("server-test")
    (run,) = client.search_runs([experiment.experiment_id])
    run_id = run.info.run_id
    assert run.info.run_name == "three-steps" and run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2, 3]
    assert run.data.params["data.seq_len"] == "32"
    assert [a.path for a in client.list_artifacts(run_id)] == ["config.yaml", "eval"]
    assert [a.path for a in client.list_artifacts(run_id, "eval")] == ["eval/loss_by_position.png", "eval/passkey.png"]
    for name in ("loss_by_position.png", "passkey.png"):  # the bytes drawn at step 3, which is the last eval
        assert artifact_bytes(client, run_id, f"eval/{name}", tmp_path / "got") == (out / "eval" / name).read_bytes()
    assert not (out / "mlflow").exists()  # nothing went to the local store

    report = tmp_path / "report"
    evaluated = run_cli("eval", "--checkpoint", str(out / "checkpoints"), "--output", str(report), "--mlflow")
    assert evaluated.returncode == 0, failure_text(evaluated.stderr + evaluated.stdout)
    assert evaluated.stderr.count(HOLDOUT_LINE) == 1, failure_text(evaluated.stderr)
    (again,) = client.search_runs([experiment.experiment_id])  # no new run: the training run got the eval
    trained, ours = [m.value for m in client.get_metric_history(run_id, "eval_loss")]
    assert [m.step for m in client.get_metric_history(run_id, "eval_loss")] == [3, 3]
    assert ours == pytest.approx(trained, rel=1e-5)  # the same weights, batches and layout
    assert again.data.metrics.keys() >= {"eval_ppl", "eval_loss_pos_0_127", "passkey_acc_128_50"}
    assert again.info.status == "FINISHED"
    names = ["eval.json", "loss_by_position.png", "passkey.png"]
    assert [a.path for a in client.list_artifacts(run_id, "ithaca_eval/report")] == \
        [f"ithaca_eval/report/{name}" for name in names]
    for name in names:
        assert artifact_bytes(client, run_id, f"ithaca_eval/report/{name}", tmp_path / "got2") == \
            (report / name).read_bytes()
