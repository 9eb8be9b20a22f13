"""`ithaca submit`: a run config -> a SLURM batch job (slurm/job.sbatch filled in), sent with sbatch.

The job trains a frozen copy of the resolved config (written beside its logs), is requeueable,
and asks SLURM for USR1 `signal_grace` seconds before its time limit: training then checkpoints
at the next step boundary and the batch script requeues the job, which resumes on its own.
With --min-nodes the job is elastic: it goes on without a node that dies, on the nodes left.
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
    min_nodes: int | None = None
    """Elastic: SLURM may start the job on min_nodes..nodes nodes and does not end it when one fails;
    the nodes left restart (one of max_restarts) on a layout fitted to them."""

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise ConfigError("--nodes", self.nodes, "use 1 or more nodes")
        if self.gpus_per_node < 0:
            raise ConfigError("--gpus-per-node", self.gpus_per_node, "use 0 (CPU processes) or more")
        if self.signal_grace < 1:
            raise ConfigError("--signal-grace", self.signal_grace, "use 1 or more seconds")
        if self.max_restarts < 0:
            raise ConfigError("--max-restarts", self.max_restarts, "use 0 (no restarts) or more")
        if self.min_nodes is not None:
            if not 1 <= self.min_nodes <= self.nodes:
                raise ConfigError("--min-nodes", self.min_nodes, f"use 1 to --nodes={self.nodes}")
            if self.max_restarts < 1:
                raise ConfigError("--max-restarts", self.max_restarts, "use 1 or more with --min-nodes: the "
                                  "nodes left go on by a restart")

    @property
    def is_elastic(self) -> bool:
        return self.min_nodes is not None

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

    def check_elastic(self, cfg: RunConfig) -> None:
        """Raises ConfigError if some node count from min_nodes to nodes cannot hold tp x pp x sp
        (launcher/runtime/elastic.py keeps it and shrinks dp)."""
        p, nproc = cfg.parallel, self.processes_per_node(cfg)
        group = p.tp * p.pp * p.sp
        for nodes in range(self.min_nodes or self.nodes, self.nodes):
            if nodes * nproc % group:
                raise ConfigError("--min-nodes", self.min_nodes, f"{nodes} node(s) x {nproc} processes cannot hold "
                                  f"tp x pp x sp = {group} ranks; use more nodes, or smaller tp, pp or sp")


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
    job.check_elastic(cfg)
    nodes = f"{job.min_nodes}-{job.nodes}" if job.is_elastic else str(job.nodes)
    options = [f"--job-name={name}", f"--nodes={nodes}"]
    if not job.is_elastic:  # srun asks for one task a node; given to sbatch with a node range, SLURM
        options.append("--ntasks-per-node=1")  # allocates the range's minimum (22.05), not what is free
    if job.gpus_per_node:
        options.append(f"--gpus-per-node={job.gpus_per_node}")
    else:
        options.append(f"--cpus-per-task={nproc}")
    options += [f"--{flag}={value}" for flag, value in
                (("partition", job.partition), ("account", job.account), ("time", job.time), ("qos", job.qos))
                if value is not None]
    options += [f"--output={files.logs}/%x-%j.out", "--open-mode=append", "--requeue",
                f"--signal=USR1@{job.signal_grace}"]
    if job.is_elastic:
        options.append("--no-kill")  # a failed node leaves the job running on the others
    if job.gpus_per_node:
        environment = ["export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}",
                       "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1  # a dead rank fails collectives, not hangs them"]
    else:
        environment = ["export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}",
                       "export CUDA_VISIBLE_DEVICES=  # CPU processes talk over gloo",
                       "export DS_ACCELERATOR=cpu"]
    if job.is_elastic:
        environment.append('export NODE_STATUS="$OUTPUT_DIR/slurm/node-status-$SLURM_JOB_ID"  # torchrun\'s exit, per node')
    values = {"sbatch_options": "\n".join(f"#SBATCH {o}" for o in options),
              "workdir": shlex.quote(str(workdir or Path.cwd())), "python": shlex.quote(python),
              "config": shlex.quote(str(files.config)), "nproc_per_node": str(nproc),
              "checkpoint_dir": shlex.quote(str(cfg.checkpoint_dir.resolve())),
              "max_restarts": str(job.max_restarts),
              "output_dir": shlex.quote(str(Path(cfg.train.output_dir).resolve())),
              "environment": "\n".join(environment),
              # the job's max nodes are those SLURM gave it: the rendezvous closes once they all joined
              "nnodes": f'"{job.min_nodes}:$SLURM_JOB_NUM_NODES"' if job.is_elastic else '"$SLURM_JOB_NUM_NODES"',
              # elastic: a task that fails, or a node SLURM finds dead, leaves the other nodes' tasks running
              "srun_options": "--kill-on-bad-exit=0 --no-kill" if job.is_elastic else "--kill-on-bad-exit=1",
              "node_status": _NODE_STATUS if job.is_elastic else "",
              "elastic_status": _ELASTIC_STATUS if job.is_elastic else ""}
    template = resources.files("ithaca.slurm").joinpath("job.sbatch").read_text()
    template = re.sub(r"^\{\{(\w+)\}\}\n", lambda m: f"{values[m.group(1)]}\n" if values[m.group(1)] else "", template,
                      flags=re.MULTILINE)  # a block left out leaves no empty line
    return re.sub(r"\{\{(\w+)\}\}", lambda m: values[m.group(1)], template)


# In an elastic job each node's task records how its torchrun ended. srun fails when a node's processes
# died while its slurmd lives (a node SLURM marks down is not counted), but the job succeeded if a
# node left finished the run.
_NODE_STATUS = "\n".join([
    "status=$?",
    'mkdir -p "$NODE_STATUS" && echo $status > "$NODE_STATUS/$SLURMD_NODENAME"',
    "exit $status"])
_ELASTIC_STATUS = "\n".join([
    'if [ $status -ne 0 ] && grep -qsx 0 "$NODE_STATUS"/*; then',
    '    echo "ithaca: srun exited with $status (a node\'s processes died); the nodes left finished the run"',
    "    status=0",
    "fi",
    'rm -rf "$NODE_STATUS"'])


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
