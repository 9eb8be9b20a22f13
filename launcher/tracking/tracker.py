"""MLflow tracking for a run, on rank 0, that never waits on MLflow.

Every call is a line in the run's journal on disk first (launcher/tracking/journal.py), and a
background thread pushes the journal to the tracking URI (launcher/tracking/push.py). MLflow gets
params = the resolved config, metrics per step, the config artifact, file artifacts (the eval
plots), the run's status, and MLflow's system metrics ("system/...": CPU, memory, disk, network;
GPUs where nvidia-ml-py is installed) of rank 0's machine, sampled every 10 s by MLflow's own
thread while the store answers.

Outages: when the store does not answer, one warning line; training goes on, the journal grows,
and the thread tries again every RETRY_EVERY_S seconds and catches up when it answers. `finish`
waits up to `tracking.flush_timeout` seconds for the rest, then leaves it in the journal and says,
in one line, to push it with `ithaca track-sync <train.output_dir>`.

Run identity: `Tracker.run_id` is the run's tracking key, a uuid made here, so it exists while the
server is down; the checkpoint stores it and a resume passes it back. MLflow's own run id is
assigned by the server at first contact, and the pusher maps the key to it.

Each step once: a resume replays the steps between its checkpoint and the stop, bit for bit
(tests/e2e/test_train_cli.py), and the journal already holds those up to its last step, so they are
not logged again: a run's curve in MLflow holds every step once, with the value first logged.
"""

from __future__ import annotations

import logging
import threading
import uuid
from pathlib import Path

from ithaca.launcher.config.schema import RunConfig
from ithaca.launcher.tracking.journal import Journal, journal_path
from ithaca.log import get_logger

log = get_logger(__name__)

PUSH_EVERY_S, RETRY_EVERY_S = 1.0, 5.0


def flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    """{"train": {"steps": 20}} -> {"train.steps": "20"}."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat


def local_store(cfg: RunConfig) -> Path:
    return (Path(cfg.train.output_dir) / "mlflow").resolve()


def tracking_uri(cfg: RunConfig) -> str:
    """The configured server, or a SQLite store in the output folder (MLflow 3 retired the file store)."""
    return cfg.tracking.uri or f"sqlite:///{local_store(cfg) / 'mlflow.db'}"


class Tracker:
    """One MLflow run per training run; a resumed run (`run_id` from its checkpoint) continues it."""

    def __init__(self, cfg: RunConfig, config_yaml: str, run_id: str | None):
        self.run_id = run_id or uuid.uuid4().hex
        self._uri, self._output = tracking_uri(cfg), Path(cfg.train.output_dir)
        self._flush_timeout = cfg.tracking.flush_timeout
        self._journal = Journal(journal_path(self._output, self.run_id))
        self._logged_through = self._journal.last_step
        if self._logged_through:
            log.info(f"tracking: run {self.run_id} has steps up to {self._logged_through} in its journal; the "
                     "replay of those after the checkpoint is not logged again")
        artifacts = None
        if cfg.tracking.uri is None:  # a new local experiment keeps its artifacts beside its store, not in the cwd
            local_store(cfg).mkdir(parents=True, exist_ok=True)
            artifacts = (local_store(cfg) / "artifacts").as_uri()
        self._journal.start(uri=self._uri, experiment=cfg.tracking.experiment, run_name=cfg.tracking.run_name,
                            artifact_location=artifacts, resumed=run_id is not None)
        if run_id is None:
            self._journal.params(flatten(cfg.to_dict()))
            self._journal.text("config.yaml", config_yaml)
        self._pushing = _BackgroundPush(self._journal.path, self._uri, self._output)
        self._pushing.start()

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        """Journal one step's metrics: a line written to the OS; the push is on another thread."""
        if step <= self._logged_through:
            return  # a resume's replay of a step logged before the stop (module docstring)
        self._journal.metrics(step, metrics)

    def log_file(self, artifact_path: str, file: Path) -> None:
        """Journal `file` as the run's artifact `artifact_path`: a copy now, pushed later (the file may change)."""
        self._journal.append_file(artifact_path, file)

    def finish(self, status: str) -> None:
        """End the run: FINISHED, FAILED, or KILLED (stopped to be resumed, which reopens it); waits up
        to tracking.flush_timeout seconds for the journal to reach MLflow."""
        self._journal.end(status)
        self._journal.close()
        self._pushing.finish(self._flush_timeout)
        from ithaca.launcher.tracking.push import unpushed  # push.py imports MLflow (seconds): only when needed

        left = unpushed(self._journal.path, self._uri)
        if left:
            log.warning(f"tracking: {left} records of run {self.run_id} not pushed to {self._uri} within "
                        f"tracking.flush_timeout={self._flush_timeout:g}s; they are in {self._journal.path}: "
                        f"push them with `ithaca track-sync {self._output}`")


class _BackgroundPush:
    """A thread that pushes the journal every PUSH_EVERY_S seconds while the store answers and every
    RETRY_EVERY_S while it does not, and runs MLflow's system-metrics monitor while it answers."""

    def __init__(self, journal: Path, uri: str, output_dir: Path):
        self._journal, self._uri, self._output = journal, uri, output_dir
        self._finishing, self._wake, self._stop = threading.Event(), threading.Event(), threading.Event()
        # A daemon: the process never waits on MLflow at exit; what is left stays in the journal.
        self._thread = threading.Thread(target=self._run, name="ithaca-tracking", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def finish(self, timeout: float) -> None:
        """Push the rest and stop; after `timeout` seconds stop waiting (and pushing, after the call in flight)."""
        self._finishing.set()
        self._wake.set()
        self._thread.join(timeout)
        self._stop.set()
        self._wake.set()
        self._thread.join(0.5)  # a thread waiting to retry ends now and lets go of the journal for `track-sync`

    def _run(self) -> None:
        # Imported here: it imports MLflow, which takes seconds, off the training thread.
        from ithaca.launcher.tracking.push import JournalPusher, Refused, Unreachable

        # The monitor's own lines (started, stopped, failed to log) would repeat our outage warning at every restart.
        logging.getLogger("mlflow.system_metrics").setLevel(logging.CRITICAL)
        pusher, monitor, is_down = None, None, False
        try:
            pusher = JournalPusher(self._journal, self._uri, wait_for_lock=True)
            while not self._stop.is_set():
                finishing = self._finishing.is_set()
                try:
                    pusher.push()
                except Unreachable as err:
                    if not is_down and not self._stop.is_set():
                        log.warning(f"tracking: {self._uri} does not answer ({err}); training goes on, journaling to "
                                    f"{self._journal} and pushing when it answers")
                    is_down = True
                else:
                    if is_down:
                        log.info(f"tracking: {self._uri} answers again; the journaled records are pushed")
                    if monitor is not None and (is_down or finishing):
                        monitor.finish()  # after an outage its thread has given up; a new one resumes its steps
                        monitor = None
                    if finishing:
                        return
                    if monitor is None:
                        monitor = _start_system_metrics(pusher.run_id, self._uri)
                    is_down = False
                self._wake.wait(RETRY_EVERY_S if is_down else PUSH_EVERY_S)
                self._wake.clear()
        except Refused as err:
            log.warning(str(err))
        except Exception:
            log.exception(f"tracking: pushing to {self._uri} stopped on an unexpected error; every record stays in "
                          f"{self._journal}: push it with `ithaca track-sync {self._output}`")
        finally:
            if pusher is not None:
                pusher.close()


def _start_system_metrics(run_id: str, uri: str):
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, resume_logging=True, tracking_uri=uri)  # continues earlier sessions' steps
    monitor.start()
    return monitor
