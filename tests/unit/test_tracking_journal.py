"""The tracking journal and its pusher (launcher/tracking/: tracker.py, journal.py, push.py) in
one process: a store that never answers does not hold up `log_step` or `finish`, `track-sync`
pushes a journal once however often it runs, a resume does not log its replayed steps again, and
what cannot be pushed is said in one line."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from harness import free_port
from ithaca.launcher.cli.main import main
from ithaca.launcher.config.schema import ConfigError
from ithaca.launcher.config.load import load_config
from ithaca.launcher.tracking.journal import durable_records, find_journals
from ithaca.launcher.tracking.tracker import Tracker
from ithaca.launcher.tracking.push import JournalPusher


def config(out: Path, *extra: str):
    return load_config("debug-cpu", [f"train.output_dir={out}", "tracking.experiment=journal-test", *extra])


def metrics(step: int) -> dict[str, float]:
    return {"loss": 10.0 / step, "lr": 1e-3, "skipped_steps": 0}


def journal_records(out: Path) -> list[dict]:
    (journal,) = find_journals(out)
    return [json.loads(line) for line in journal.read_text().splitlines()]


@pytest.fixture(autouse=True)
def mlflow_request_settings(monkeypatch):
    """The pusher's settings, set here so that they are undone after each test."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


@pytest.fixture
def silent_server():
    """A TCP server that accepts connections and never answers: every MLflow request hangs."""
    listener = socket.create_server(("127.0.0.1", free_port()))
    connected, held = threading.Event(), []

    def accept() -> None:
        while True:
            try:
                held.append(listener.accept()[0])
            except OSError:  # closed at teardown
                return
            connected.set()

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}", connected
    listener.close()
    for conn in held:
        conn.close()


def test_log_step_and_finish_return_while_the_server_hangs(silent_server, tmp_path, caplog, monkeypatch):
    uri, connected = silent_server
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "600")  # the pusher's request stays in flight all test long
    tracker = Tracker(config(tmp_path, f"tracking.uri={uri}", "tracking.flush_timeout=0.5"), "a: 1\n", None)
    assert connected.wait(timeout=60), "the pusher never contacted the server"
    for step in range(1, 101):  # each returns although the pusher waits on an unanswered request
        tracker.log_step(step, metrics(step))
    tracker.finish("FINISHED")  # waits 0.5 s, not the request's 600 s
    records = journal_records(tmp_path)
    assert [r["kind"] for r in records] == ["start", "params", "text"] + ["metrics"] * 100 + ["end"]
    assert [r["step"] for r in records if r["kind"] == "metrics"] == list(range(1, 101))
    err = caplog.text
    assert f"tracking: 104 records of run {tracker.run_id} not pushed to {uri}" in err
    assert f"push them with `ithaca track-sync {tmp_path}`" in err


def test_an_unreachable_server_is_one_warning_and_track_sync_pushes_the_journal_once(tmp_path, caplog, capsys):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens: connections are refused
    tracker = Tracker(config(tmp_path, f"tracking.uri={uri}", "tracking.flush_timeout=3"), "a: 1\n", None)
    for step in range(1, 6):
        tracker.log_step(step, metrics(step))
    tracker.finish("KILLED")
    err = caplog.text
    assert err.count("does not answer ([Errno 111] Connection refused); training goes on") == 1, err
    assert f"tracking: 9 records of run {tracker.run_id} not pushed" in err

    store = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    assert main(["track-sync", str(tmp_path), "--uri", store]) == 0
    assert main(["track-sync", str(tmp_path), "--uri", store]) == 0
    (journal,) = find_journals(tmp_path)
    journal.with_suffix(".sync.json").unlink()  # as if a crash lost the progress: found again by its tag
    assert main(["track-sync", str(tmp_path), "--uri", store]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"run {tracker.run_id}: pushed 9 records (MLflow run ")
    assert out[1].startswith(f"run {tracker.run_id}: nothing left to push")
    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("journal-test").experiment_id])
    assert run.info.status == "KILLED" and run.data.tags["ithaca.run_key"] == tracker.run_id
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")] == \
        [(s, 10.0 / s) for s in range(1, 6)]
    assert run.data.params["train.output_dir"] == str(tmp_path)
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["config.yaml"]

    assert main(["track-sync", str(tmp_path), "--uri", uri]) == 1
    assert capsys.readouterr().err.strip().endswith("run this again when it answers")


def test_a_resume_logs_each_step_once_into_the_same_run(tmp_path):
    cfg = config(tmp_path)  # the local SQLite store
    first = Tracker(cfg, "a: 1\n", None)
    for step in range(1, 8):  # a checkpoint at step 4, then a crash after step 7
        first.log_step(step, metrics(step))
    first.finish("KILLED")
    (journal,) = find_journals(tmp_path)
    with journal.open("a") as f:
        f.write('{"kind": "metrics", "step": 8, "time')  # the crash tore the last line

    resumed = Tracker(cfg, "a: 1\n", first.run_id)
    for step in range(5, 11):  # replays 5..7 bit for bit (and 8, whose record was torn), then goes on
        resumed.log_step(step, {**metrics(step), "loss": -1.0} if step <= 7 else metrics(step))
    resumed.finish("FINISHED")
    client = MlflowClient(f"sqlite:///{tmp_path.resolve() / 'mlflow' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("journal-test").experiment_id])
    assert run.info.status == "FINISHED"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")] == \
        [(s, 10.0 / s) for s in range(1, 11)]  # the first value of each step, once


def test_track_sync_refusals_are_one_line(tmp_path, capsys):
    uri = f"http://127.0.0.1:{free_port()}"
    tracker = Tracker(config(tmp_path, f"tracking.uri={uri}", "tracking.flush_timeout=0"), "a: 1\n", None)
    tracker.finish("FAILED")
    (journal,) = find_journals(tmp_path)
    store = f"sqlite:///{tmp_path / 'store.db'}"
    client = MlflowClient(store)
    client.delete_experiment(client.create_experiment("journal-test", artifact_location=(tmp_path / "artifacts").as_uri()))
    assert main(["track-sync", str(tmp_path), "--uri", store]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == (  # after MLflow's lines creating the store
        f"ithaca: tracking: {store} refused a run for {journal}: The experiment 1 must be in the 'active' state. "
        f"Current state is deleted; fix that, then push it with `ithaca track-sync {tmp_path}`")

    holder = JournalPusher(journal, store, wait_for_lock=True)  # as a training run's pusher holds it
    try:
        assert main(["track-sync", str(tmp_path), "--uri", store]) == 1
    finally:
        holder.close()
    assert capsys.readouterr().err == (f"ithaca: {journal}: another process is pushing it (its training run or "
                                       "track-sync); run this again when that has finished\n")


def test_a_negative_flush_timeout_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="tracking.flush_timeout=-1.0: use 0 or more seconds"):
        config(tmp_path, "tracking.flush_timeout=-1")


def test_a_record_the_store_refuses_is_logged_once_and_the_rest_is_pushed(tmp_path, caplog):
    uri = f"http://127.0.0.1:{free_port()}"
    tracker = Tracker(config(tmp_path, f"tracking.uri={uri}", "tracking.flush_timeout=0"), "a: 1\n", None)
    tracker.log_step(1, metrics(1))
    tracker.finish("FINISHED")
    store = f"sqlite:///{tmp_path / 'store.db'}"
    client = MlflowClient(store)
    taken = client.create_run(client.create_experiment("journal-test", artifact_location=(tmp_path / "artifacts").as_uri()), tags={"ithaca.run_key": tracker.run_id})
    client.log_param(taken.info.run_id, "train.steps", "999")  # MLflow refuses to change a param's value
    assert main(["track-sync", str(tmp_path), "--uri", store]) == 0
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 1 and refusals[0].startswith(f"tracking: {store} refused the params of MLflow run "
                                                         f"{taken.info.run_id}: Changing param values is not allowed")
    run = client.get_run(taken.info.run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["loss"] == 10.0


def test_an_artifact_is_pushed_once_with_the_bytes_it_had_when_journaled(tmp_path, caplog):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens: the records stay in the journal
    tracker = Tracker(config(tmp_path, f"tracking.uri={uri}", "tracking.flush_timeout=0"), "a: 1\n", None)
    plot = tmp_path / "drawn.png"
    plot.write_bytes(b"step 2's plot")
    tracker.log_file("eval/plot.png", plot)
    plot.write_bytes(b"redrawn after")  # the journal's copy keeps what it was when journaled
    tracker.finish("FINISHED")
    (journal,) = find_journals(tmp_path)
    store = f"sqlite:///{tmp_path / 'store.db'}"

    def push_from(offset: int) -> None:  # as after a crash that lost the progress written after `offset`
        state = json.loads(journal.with_suffix(".sync.json").read_text()) if offset else {}
        if offset:
            state[store]["offset"] = offset
            journal.with_suffix(".sync.json").write_text(json.dumps(state))
        pusher = JournalPusher(journal, store, wait_for_lock=True)
        try:
            pusher.push()
        finally:
            pusher.close()

    push_from(0)
    before_artifact = [end for record, end in durable_records(journal, 0) if record["kind"] == "text"][0]
    push_from(before_artifact)  # the artifact again: it replaces itself
    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("journal-test").experiment_id])
    assert [a.path for a in client.list_artifacts(run.info.run_id, "eval")] == ["eval/plot.png"]
    got = Path(client.download_artifacts(run.info.run_id, "eval/plot.png", str(tmp_path / "got")))
    assert got.read_bytes() == b"step 2's plot"

    (copy,) = (tmp_path / "tracking").glob("*.files/*/plot.png")
    copy.unlink()  # a copy deleted by hand: that record is passed over in one line, the rest pushed
    push_from(before_artifact)
    gone = [r.getMessage() for r in caplog.records if "is gone" in r.getMessage()]
    assert gone == [f"tracking: {copy}, the journaled copy of artifact eval/plot.png, is gone; left out of MLflow "
                    f"run {run.info.run_id}"]
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
