"""MLflow tracking for a run, on rank 0: params = the resolved config, metrics per step, config artifact,
and MLflow's system metrics ("system/...": CPU, memory, disk, network; GPUs where nvidia-ml-py is
installed) of rank 0's machine, sampled every 10 s by MLflow's own thread."""

from __future__ import annotations

from pathlib import Path

from ithaca.launcher.config import RunConfig


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
    """One MLflow run per training run; a resumed run continues the run it was checkpointed with."""

    def __init__(self, cfg: RunConfig, config_yaml: str, run_id: str | None):
        import mlflow  # slow to import; only rank 0 needs it

        self._mlflow = mlflow
        mlflow.set_tracking_uri(tracking_uri(cfg))
        if run_id is None:
            self._use_experiment(cfg)
            self.run = mlflow.start_run(run_name=cfg.tracking.run_name, log_system_metrics=True)
            mlflow.log_params(flatten(cfg.to_dict()))
            mlflow.log_text(config_yaml, "config.yaml")
        else:
            self.run = mlflow.start_run(run_id=run_id, log_system_metrics=True)  # continues system/ steps
        self.run_id = self.run.info.run_id

    def _use_experiment(self, cfg: RunConfig) -> None:
        """Select the experiment; a new local one keeps its artifacts beside its store, not in the cwd."""
        name = cfg.tracking.experiment
        if cfg.tracking.uri is None:
            local_store(cfg).mkdir(parents=True, exist_ok=True)
            if self._mlflow.get_experiment_by_name(name) is None:
                self._mlflow.create_experiment(name, artifact_location=(local_store(cfg) / "artifacts").as_uri())
        self._mlflow.set_experiment(name)

    def log_step(self, step: int, metrics: dict[str, float]) -> None:
        self._mlflow.log_metrics(metrics, step=step)

    def finish(self, status: str) -> None:
        """End the MLflow run: FINISHED, FAILED, or KILLED (stopped to be resumed, which reopens it)."""
        self._mlflow.end_run(status=status)
