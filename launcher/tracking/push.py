"""Pushing a tracking journal (launcher/tracking/journal.py) to an MLflow tracking URI, resumably.

Per journal and URI, `<key>.sync.json` beside it holds the MLflow run the journal maps to and the
byte offset pushed so far, rewritten after every accepted call: a push starts where the last one
stopped, so pushing twice logs nothing twice. A process killed between an accepted call and that
write sends the call again, which changes nothing: MLflow's SQL stores keep one row per metric
(key, step, timestamp, value), the params, config text and statuses are the same as before, and an
artifact is uploaded again to the same path with the same bytes (the journal's copy), replacing itself.

The journal's MLflow run, found at first contact (MLflow's server assigns run ids, and the REST
API takes none from the client): the one the sync state names; else the run of the experiment
tagged `ithaca.run_key=<key>` (created before a crash lost the state); else a new run with that tag.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import requests
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException

from ithaca.launcher.tracking.journal import count_records, durable_records
from ithaca.log import get_logger, warn_once

log = get_logger(__name__)

RUN_KEY_TAG = "ithaca.run_key"
SQLITE = "sqlite:///"
_METRICS_PER_CALL, _PARAMS_PER_CALL = 1000, 100  # MLflow's log_batch limits


class Unreachable(Exception):
    """The tracking store did not answer (or was overloaded); the journal keeps the rest for a later push."""


class Refused(ValueError):
    """The tracking store refused to give the journal a run (e.g. its experiment was deleted)."""


class JournalPusher:
    """Sends one journal's records to one tracking URI; holds the journal's push lock until `close`.

    `wait_for_lock`: wait while another process pushes this journal (a training run's pusher does),
    or raise ValueError at once (what `ithaca track-sync` does)."""

    def __init__(self, journal: Path, uri: str, *, wait_for_lock: bool):
        # MLflow retries a failed request 7 times over about 4 minutes; the journal is our retry,
        # so fail fast and try again on our own schedule (a user's own settings win)
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self.journal, self.uri, self.key = journal, uri, journal.stem
        self._lock = _lock(journal.with_suffix(".lock"), wait_for_lock)
        self._state_path = journal.with_suffix(".sync.json")
        mine = _read_state(self._state_path).get(uri, {})
        self.run_id: str | None = mine.get("run_id")
        """The MLflow run id, once known."""
        self.offset: int = mine.get("offset", 0)
        self._client = MlflowClient(uri)

    def push(self) -> int:
        """Send every complete record after the pushed offset; returns how many were sent.

        Raises Unreachable when the store does not answer (what was accepted before stays pushed),
        and Refused when it will not give the journal a run. A record it refuses (an invalid value)
        is logged once and passed over."""
        sent = 0
        with _no_answer_is_unreachable():
            if self.run_id is None:
                self._find_or_create_run()
            batch: list[Metric] = []
            batch_end = self.offset
            for record, end in durable_records(self.journal, self.offset):
                is_metrics = record["kind"] == "metrics"
                if batch and (not is_metrics or len(batch) + len(record["values"]) > _METRICS_PER_CALL):
                    self._send_metrics(batch, batch_end)
                    batch = []
                if is_metrics:
                    batch += [Metric(k, v, record["time_ms"], record["step"]) for k, v in record["values"].items()]
                    batch_end = end
                else:
                    self._send(record)
                    self._advance(end)
                sent += 1
            if batch:
                self._send_metrics(batch, batch_end)
        return sent

    def close(self) -> None:
        self._lock.close()  # releases the flock

    def _send_metrics(self, batch: list[Metric], end: int) -> None:
        self._call("metrics", self._client.log_batch, self.run_id, metrics=batch)
        self._advance(end)

    def _send(self, record: dict) -> None:
        kind, run_id = record["kind"], self.run_id
        if kind == "params":
            params = [Param(k, v) for k, v in record["values"].items()]
            for i in range(0, len(params), _PARAMS_PER_CALL):
                self._call("params", self._client.log_batch, run_id, params=params[i:i + _PARAMS_PER_CALL])
        elif kind == "text":
            self._call(record["path"], self._client.log_text, run_id, record["text"], record["path"])
        elif kind == "artifact":
            self._send_artifact(record)
        elif kind == "start" and record["resumed"]:  # a new run is RUNNING from its creation
            self._call("status RUNNING", self._client.update_run, run_id, status="RUNNING")
        elif kind == "end":
            self._call(f"status {record['status']}", self._client.set_terminated, run_id, record["status"],
                       end_time=record["time_ms"])

    def _send_artifact(self, record: dict) -> None:
        copy = self.journal.parent / record["file"]
        if not copy.is_file():
            warn_once(log, f"tracking: {copy}, the journaled copy of artifact {record['path']}, is gone; left out of "
                           f"MLflow run {self.run_id}")
            return
        folder = os.path.dirname(record["path"]) or None
        self._call(record["path"], self._client.log_artifact, self.run_id, str(copy), folder)

    def _call(self, what: str, call: Callable, *args: object, **kwargs: object) -> None:
        try:
            call(*args, **kwargs)
        except MlflowException as err:
            if _is_no_answer(err):
                raise
            warn_once(log, f"tracking: {self.uri} refused the {what} of MLflow run {self.run_id}: {err.message}; "
                           f"left out of MLflow (kept in {self.journal})")

    def _advance(self, offset: int) -> None:
        self.offset = offset
        state = _read_state(self._state_path)
        state[self.uri] = {"run_id": self.run_id, "offset": offset}
        tmp = self._state_path.with_suffix(".tmp")
        with tmp.open("w") as f:
            json.dump(state, f)
            f.flush()
            os.fsync(f.fileno())  # a state lost to a crash only re-sends records, but a torn one would stop pushes
        os.replace(tmp, self._state_path)

    def _find_or_create_run(self) -> None:
        start, _ = next(durable_records(self.journal, 0))
        client = self._client
        try:
            experiment_id = self._experiment_id(start["experiment"], start["artifact_location"])
            tagged = client.search_runs([experiment_id], f"tags.`{RUN_KEY_TAG}` = '{self.key}'", max_results=1)
            if tagged:
                self.run_id = tagged[0].info.run_id
            else:
                self.run_id = client.create_run(experiment_id, start_time=start["time_ms"],
                                                tags={RUN_KEY_TAG: self.key}, run_name=start["run_name"]).info.run_id
        except MlflowException as err:
            if _is_no_answer(err):
                raise
            raise Refused(f"tracking: {self.uri} refused a run for {self.journal}: {err.message.rstrip('.')}; fix "
                          f"that, then push it with `ithaca track-sync {self.journal.parent.parent}`") from err
        self._advance(self.offset)  # records the run before anything is sent to it
        log.info(f"tracking: run {self.key} is MLflow run {self.run_id} (experiment {start['experiment']!r}) "
                 f"at {self.uri}")

    def _experiment_id(self, name: str, artifact_location: str | None) -> str:
        found = self._client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        if artifact_location is None and self.uri.startswith(SQLITE):
            # MLflow's default for a SQLite store is ./mlruns in whatever folder the pusher runs from
            artifact_location = (Path(self.uri.removeprefix(SQLITE)).resolve().parent / "artifacts").as_uri()
        try:
            return self._client.create_experiment(name, artifact_location=artifact_location)
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            return self._client.get_experiment_by_name(name).experiment_id  # another run created it just now


def unpushed(journal: Path, uri: str) -> int:
    """Records of `journal` not yet accepted at `uri`."""
    return count_records(journal, _read_state(journal.with_suffix(".sync.json")).get(uri, {}).get("offset", 0))


def journal_uri(journal: Path) -> str:
    """The tracking URI the run's latest session was started with."""
    return [r["uri"] for r, _ in durable_records(journal, 0) if r["kind"] == "start"][-1]


def _is_no_answer(err: MlflowException) -> bool:
    """No answer, a server error, or a rate limit: worth trying again later, unlike a refusal."""
    status = err.get_http_status_code()
    return status >= 500 or status == 429


@contextmanager
def _no_answer_is_unreachable() -> Iterator[None]:
    try:
        yield
    except MlflowException as err:
        if not _is_no_answer(err):
            raise
        raise Unreachable(_reason(err)) from err
    except (requests.RequestException, ConnectionError, TimeoutError) as err:  # artifact uploads may raise these
        raise Unreachable(_reason(err)) from err


def _reason(err: BaseException) -> str:
    """The short cause in MLflow's long message, e.g. '[Errno 111] Connection refused'."""
    text = str(err)
    found = re.search(r"\[Errno -?\d+\][^\"')]*|Read timed out|timed out", text)
    return found.group(0).strip() if found else text.splitlines()[0][:160]


def _read_state(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _lock(path: Path, wait: bool):
    f = path.open("a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise ValueError(f"{path.with_suffix('.jsonl')}: another process is pushing it (its training run or "
                         "track-sync); run this again when that has finished") from None
    except OSError as err:  # e.g. a Lustre or NFS mount without flock support
        warn_once(log, f"tracking: cannot lock {path} ({err.strerror}); pushing without the lock: run no "
                       "`ithaca track-sync` on this run while it trains")
    return f
