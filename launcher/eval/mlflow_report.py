"""`ithaca eval --mlflow`: an eval's metrics and files into MLflow through a tracking journal
(launcher/tracking/journal.py), pushed at once; what the store does not take then stays in the
journal for `ithaca track-sync`, like a training run's.

`run`: into the MLflow run of the training run that wrote the checkpoint: the journal of the
tracking key its client state records, in the run's train.output_dir (the newest journal there for a
checkpoint that records none, or whose journal is gone, said in one line): the metrics at the
checkpoint's step, the files as artifacts under `ithaca_eval/<output folder name>/`; the run's
status is left as it was. Refused before the eval starts while that journal is being pushed (its
training runs, or `ithaca track-sync` pushes it), since one journal has one writer.

`new`: a new MLflow run of tracking.experiment (named tracking.run_name, else `eval <output folder
name>`) in the training run's store (tracking.uri, else the run's local store): params = the eval's
resolved config, its metrics at the checkpoint's step (0 for --hf), its files as artifacts; the
journal is in <output>/tracking/.
"""

from __future__ import annotations

import uuid
from pathlib import Path

from ithaca.launcher.config.schema import ConfigError, RunConfig
from ithaca.launcher.tracking.journal import Journal, journal_path, newest_run_key
from ithaca.launcher.tracking.tracker import flatten, tracking_uri
from ithaca.log import get_logger

log = get_logger(__name__)

EVAL_ARTIFACTS = "ithaca_eval"


def training_journal(cfg: RunConfig, run_key: str | None = None) -> Path:
    """The journal of training run `run_key` in cfg.train.output_dir, else the newest there; raises
    ConfigError when there is none."""
    if run_key is not None:
        path = journal_path(cfg.train.output_dir, run_key)
        if path.is_file():
            return path
        log.warning(f"tracking: the checkpoint's run journal {path} is gone; logging into the newest journal there")
    key = newest_run_key(cfg.train.output_dir)
    if key is None:
        raise ConfigError("--mlflow", "run", f"no tracking journal in {Path(cfg.train.output_dir) / 'tracking'} "
                          "(train.output_dir of the checkpoint's run); use --mlflow new")
    return journal_path(cfg.train.output_dir, key)


def check_training_run_free(cfg: RunConfig) -> None:
    """Raise ValueError when the training run's journal is being pushed by another process."""
    from ithaca.launcher.tracking.push import JournalPusher  # imports MLflow (seconds): only when asked

    JournalPusher(training_journal(cfg), tracking_uri(cfg), wait_for_lock=False).close()


def log_eval(cfg: RunConfig, mode: str, *, step: int, metrics: dict[str, float], files: list[Path],
             output: Path, run_key: str | None = None) -> None:
    """Journal the eval (rank 0, after it) as `mode` (run, new) says, and push the journal now.
    `cfg` is the eval's config with the training run's train.output_dir; `run_key` the tracking key
    the checkpoint records (mode run)."""
    from ithaca.launcher.tracking.push import JournalPusher

    uri = tracking_uri(cfg)
    if mode == "run":
        journal, folder, names = training_journal(cfg, run_key), cfg.train.output_dir, f"{EVAL_ARTIFACTS}/{output.name}/"
    else:
        journal, folder, names = journal_path(output, uuid.uuid4().hex), output, ""
    journal.parent.mkdir(parents=True, exist_ok=True)
    pusher = JournalPusher(journal, uri, wait_for_lock=False)  # its lock is held while this process writes the journal
    try:
        writer = Journal(journal)
        if mode == "new":
            writer.start(uri=uri, experiment=cfg.tracking.experiment,
                         run_name=cfg.tracking.run_name or f"eval {output.name}", artifact_location=None,
                         resumed=False)
            writer.params(flatten(cfg.to_dict()))
            config_file = output / "config.yaml"
            if config_file.is_file():
                writer.text("config.yaml", config_file.read_text())
        writer.metrics(step, metrics)
        for file in files:
            writer.append_file(names + file.name, file)
        if mode == "new":
            writer.end("FINISHED")
        writer.close()
        _push(pusher, folder, step)
    finally:
        pusher.close()


def _push(pusher, folder: str | Path, step: int) -> None:
    from ithaca.launcher.tracking.push import Refused, Unreachable

    try:
        pusher.push()
    except (Unreachable, Refused) as err:
        log.warning(f"tracking: the eval is journaled in {pusher.journal} but {pusher.uri} did not take it ({err}); "
                    f"push it with `ithaca track-sync {folder}`")
        return
    log.info(f"tracking: eval logged into MLflow run {pusher.run_id} at {pusher.uri}, step {step}")
