"""`ithaca submit`: a run config -> a SLURM batch job (slurm/job.sbatch filled in), sent with sbatch.

The job trains a frozen copy of the resolved config (written beside its logs), is requeueable,
and asks SLURM for USR1 `signal_grace` seconds before its time limit: training then checkpoints
at the next step boundary and the batch script requeues the job, which resumes on its own.
"""

from __future__ import annotations

import hashlib
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml

from ithaca.launcher.config.schema import ConfigError, RunConfig


@dataclass(frozen=True, kw_only=True)
class SlurmJob:
    nodes: int
    gpus_per_node: int
    """0: CPU processes (gloo), as many per node as the config's world size needs."""
    partition: str | None = None
    account: str | None = None
    time: str | None = None
    """SLURM's time limit, e.g. 04:00:00 or 2-00:00:00."""
    qos: str | None = None
    signal_grace: int = 120
    """Seconds before the time limit at which SLURM sends USR1 (the checkpoint-and-requeue signal)."""
    max_restarts: int = 0
    """Times torchrun restarts every rank (from the latest complete checkpoint) after one fails,
    within the job, before the job fails."""

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise ConfigError("--nodes", self.nodes, "use 1 or more nodes")
        if self.gpus_per_node < 0:
            raise ConfigError("--gpus-per-node", self.gpus_per_node, "use 0 (CPU processes) or more")
        if self.signal_grace < 1:
            raise ConfigError("--signal-grace", self.signal_grace, "use 1 or more seconds")
        if self.max_restarts < 0:
            raise ConfigError("--max-restarts", self.max_restarts, "use 0 (no restarts) or more")

    def processes_per_node(self, cfg: RunConfig) -> int:
        """One process per GPU (or the world size split over the nodes on CPU); raises ConfigError if
        the config's parallel degrees do not fill the nodes exactly."""
        world = cfg.parallel.world_size
        if self.gpus_per_node:
            if world != self.nodes * self.gpus_per_node:
                raise ConfigError("--nodes", self.nodes, f"x --gpus-per-node={self.gpus_per_node} gives "
                                  f"{self.nodes * self.gpus_per_node} GPUs but dp*tp*pp*sp={world}; change the "
                                  "node count or the parallel degrees")
            return self.gpus_per_node
        if world % self.nodes:
            raise ConfigError("--nodes", self.nodes, f"must divide dp*tp*pp*sp={world} (CPU processes per node)")
        return world // self.nodes


@dataclass(frozen=True)
class JobFiles:
    """Under <train.output_dir>/slurm: the config copy and script, named by the config's content
    (a queued or requeued job keeps reading its own even if the run is submitted again with
    other settings), and the logs."""

    folder: Path
    config_yaml: str

    @property
    def _tag(self) -> str:
        return hashlib.sha256(self.config_yaml.encode()).hexdigest()[:10]

    @property
    def config(self) -> Path:
        return self.folder / f"config-{self._tag}.yaml"

    @property
    def script(self) -> Path:
        return self.folder / f"job-{self._tag}.sbatch"

    @property
    def logs(self) -> Path:
        return self.folder / "logs"


def job_files(cfg: RunConfig) -> JobFiles:
    return JobFiles(Path(cfg.train.output_dir).resolve() / "slurm", yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def render(cfg: RunConfig, job: SlurmJob, name: str, *, python: str = sys.executable, workdir: Path | None = None) -> str:
    """The batch script for `cfg` (checked: raises ConfigError if the job cannot run it)."""
    files, nproc = job_files(cfg), job.processes_per_node(cfg)
    options = [f"--job-name={name}", f"--nodes={job.nodes}", "--ntasks-per-node=1"]
    if job.gpus_per_node:
        options.append(f"--gpus-per-node={job.gpus_per_node}")
    else:
        options.append(f"--cpus-per-task={nproc}")
    options += [f"--{flag}={value}" for flag, value in
                (("partition", job.partition), ("account", job.account), ("time", job.time), ("qos", job.qos))
                if value is not None]
    options += [f"--output={files.logs}/%x-%j.out", "--open-mode=append", "--requeue",
                f"--signal=USR1@{job.signal_grace}"]
    if job.gpus_per_node:
        environment = ["export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}",
                       "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1  # a dead rank fails collectives, not hangs them"]
    else:
        environment = ["export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}",
                       "export CUDA_VISIBLE_DEVICES=  # CPU processes talk over gloo",
                       "export DS_ACCELERATOR=cpu"]
    values = {"sbatch_options": "\n".join(f"#SBATCH {o}" for o in options),
              "workdir": shlex.quote(str(workdir or Path.cwd())), "python": shlex.quote(python),
              "config": shlex.quote(str(files.config)), "nproc_per_node": str(nproc),
              "checkpoint_dir": shlex.quote(str(cfg.checkpoint_dir.resolve())),
              "max_restarts": str(job.max_restarts),
              "output_dir": shlex.quote(str(Path(cfg.train.output_dir).resolve())),
              "environment": "\n".join(environment)}
    template = resources.files("ithaca.slurm").joinpath("job.sbatch").read_text()
    return re.sub(r"\{\{(\w+)\}\}", lambda m: values[m.group(1)], template)


def submit(cfg: RunConfig, script: str) -> tuple[str, Path]:
    """Write the job's files and sbatch it; returns (job id, log file). Raises ValueError (and
    leaves no files) if sbatch is missing or refuses the job."""
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise ValueError("submit: sbatch not found; run on a SLURM login node, or add --dry-run to see the script")
    files = job_files(cfg)
    created = [p for p in (files.folder.parent, files.folder, files.logs, files.config, files.script) if not p.exists()]
    files.logs.mkdir(parents=True, exist_ok=True)
    files.config.write_text(files.config_yaml)
    files.script.write_text(script)
    done = subprocess.run([sbatch, "--parsable", str(files.script)], capture_output=True, text=True)
    if done.returncode != 0:
        for path in reversed(created):  # files before their folders
            path.rmdir() if path.is_dir() else path.unlink()
        raise ValueError(f"submit: sbatch refused the job: {done.stderr.strip() or done.stdout.strip()}")
    job_id = done.stdout.strip().split(";")[0]
    name = re.search(r"--job-name=(\S+)", script).group(1)
    return job_id, files.logs / f"{name}-{job_id}.out"
