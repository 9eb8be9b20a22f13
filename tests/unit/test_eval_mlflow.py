"""`ithaca eval --mlflow` on rank 0 after the eval (launcher/eval/mlflow_report.py), without the eval:
`new` makes a new MLflow run in the training run's store; `run` is refused while the training run's
journal is being pushed, and when the run has no journal. (`run` into a real server, through the
CLI: tests/e2e/test_mlflow_server.py.)"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from ithaca.launcher.config.load import load_config
from ithaca.launcher.config.schema import ConfigError
from ithaca.launcher.eval.mlflow_report import check_training_run_free, log_eval
from ithaca.launcher.tracking.journal import find_journals
from ithaca.launcher.tracking.push import JournalPusher
from ithaca.launcher.tracking.tracker import Tracker


@pytest.fixture(autouse=True)
def mlflow_request_settings(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def test_a_new_run_gets_the_metrics_and_files_and_a_busy_or_missing_training_run_is_refused(tmp_path):
    cfg = load_config("debug-cpu", [f"train.output_dir={tmp_path / 'run'}", "tracking.experiment=eval-test"])
    with pytest.raises(ConfigError, match=r"--mlflow='run': no tracking journal in .*run/tracking .*use --mlflow new"):
        check_training_run_free(cfg)

    report = tmp_path / "report"
    report.mkdir()
    (report / "eval.json").write_text('{"eval_loss": 2.5}\n')
    (report / "config.yaml").write_text("eval: {}\n")
    log_eval(cfg, "new", step=7, metrics={"eval_loss": 2.5, "passkey_acc_128_0": 1.0},
             files=[report / "eval.json"], output=report)
    client = MlflowClient(f"sqlite:///{tmp_path / 'run' / 'mlflow' / 'mlflow.db'}")  # the training run's store
    (run,) = client.search_runs([client.get_experiment_by_name("eval-test").experiment_id])
    assert run.info.run_name == "eval report" and run.info.status == "FINISHED"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "eval_loss")] == [(7, 2.5)]
    assert run.data.params["eval.metrics"] == "['loss', 'positions']"
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["config.yaml", "eval.json"]
    got = Path(client.download_artifacts(run.info.run_id, "eval.json", str(tmp_path / "got")))
    assert got.read_bytes() == (report / "eval.json").read_bytes()
    (journal,) = find_journals(report)  # `ithaca track-sync <output>` would push it if the store had not answered

    training = Tracker(cfg, "a: 1\n", None)
    training.finish("FINISHED")
    check_training_run_free(cfg)  # its push has ended
    holder = JournalPusher(find_journals(tmp_path / "run")[0], f"sqlite:///{tmp_path / 'x.db'}", wait_for_lock=True)
    try:
        with pytest.raises(ValueError, match="another process is pushing it .its training run or track-sync."):
            check_training_run_free(cfg)
    finally:
        holder.close()


def test_run_mode_takes_the_journal_of_the_checkpoints_run_over_a_newer_one(tmp_path):
    from ithaca.launcher.eval.mlflow_report import training_journal
    from ithaca.launcher.tracking.journal import journal_path

    cfg = load_config("debug-cpu", [f"train.output_dir={tmp_path}"])
    older, newer = journal_path(tmp_path, "older"), journal_path(tmp_path, "newer")
    older.parent.mkdir(parents=True)
    older.write_text("")
    newer.write_text("")
    os.utime(older, (1, 1))  # the checkpoint's run started first; a fresh run started in the folder since
    assert training_journal(cfg, "older") == older
    assert training_journal(cfg, None) == newer  # a checkpoint recording no key
    assert training_journal(cfg, "gone") == newer  # its journal deleted: the newest, said in one line
