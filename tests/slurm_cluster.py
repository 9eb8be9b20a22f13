"""A real SLURM cluster for the submit tests: munged, slurmctld and one slurmd on localhost, or one
slurmd in each node of a namespace cluster (tests/netns_cluster.py), each with its own address.

Everything lives under one folder: munge's key and socket, slurm.conf, state, spool, pid and log
files; commands find it through SLURM_CONF. Debian's slurm-wlm and munge are installed with
apt-get when missing (root on Debian, where failing to is an error). Daemons are stopped by
process id. Facts behind the choices: ../shared/notes/slurm-one-node.md.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from netns_cluster import NetnsCluster

PACKAGES = ("slurm-wlm", "munge")


def unavailable_reason() -> str | None:
    """Why no cluster can be had here (None: it can), installing the packages if needed.

    Only a machine that is not root on Debian has a reason: there (CI's case) the tests must run,
    so a failed apt-get is an error, not a skip."""
    if shutil.which("slurmctld") and shutil.which("munged"):
        return None
    if os.geteuid() != 0 or not Path("/etc/debian_version").is_file() or not shutil.which("apt-get"):
        return "slurm-wlm/munge are not installed, and this is not root on Debian to apt-get them"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "install", "-y", "-qq", *PACKAGES], ["apt-get", "update", "-qq"],
                    ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
        if shutil.which("slurmctld") and shutil.which("munged"):
            return None
    raise RuntimeError(f"root on Debian, but apt-get could not install {' '.join(PACKAGES)}: "
                       f"{done.stderr.strip()[-500:]}")


@dataclass(frozen=True)
class Host:
    """A node of the cluster: SLURM's NodeName and NodeAddr, and how to run a command on it."""

    name: str
    address: str
    enter: Callable[..., list[str]] = lambda *argv: list(argv)


class SlurmCluster:
    """slurmctld on the first host, one slurmd per host (its own spool, pid and log files). By
    default one host, this machine at 127.0.0.1; `namespace_hosts` gives each node of a
    namespace cluster its own. Commands (`run`, sbatch) run on the first host."""

    def __init__(self, root: Path, hosts: list[Host] | None = None):
        self.root = root
        self.hosts = hosts or [Host(socket.gethostname().split(".")[0], "127.0.0.1")]
        self.env = {**os.environ, "SLURM_CONF": str(root / "slurm.conf")}

    def start(self) -> None:
        munge = self.root / "munge"
        munge.mkdir(parents=True)
        munge.chmod(0o711)  # munged refuses a socket folder that others cannot traverse
        self._check(["mungekey", "-c", "-k", str(munge / "munge.key")])
        (munge / "munge.key").chmod(0o400)
        self._check(["munged", "--force", f"--socket={munge / 'munge.socket.2'}", f"--key-file={munge / 'munge.key'}",
                     f"--pid-file={self.root / 'munged.pid'}", f"--log-file={munge / 'munged.log'}",
                     f"--seed-file={munge / 'munged.seed'}"])
        (self.root / "slurm.conf").write_text(self._slurm_conf())
        self._check(self.hosts[0].enter("slurmctld"))
        for host in self.hosts:
            self.start_slurmd(host)
        self.wait_until_idle()

    def start_slurmd(self, host: Host) -> None:
        """slurmd on `host` (again, after a test killed it: the node returns to service)."""
        self._check(host.enter("slurmd", "-N", host.name))

    def wait_until_idle(self, timeout: float = 30) -> None:
        self._wait_until(lambda: self.run("sinfo", "-h", "-N", "-o", "%T").stdout.split() == ["idle"] * len(self.hosts),
                         timeout, "every node to be idle")

    def _slurm_conf(self) -> str:
        r, controller = self.root, self.hosts[0]
        hardware = self._check(["slurmd", "-C"]).stdout.splitlines()[0].split()
        memory = next(int(f.split("=")[1]) for f in hardware if f.startswith("RealMemory="))
        hardware = [f for f in hardware if not f.startswith(("NodeName=", "RealMemory="))]
        return "\n".join([
            "ClusterName=ithaca-test", f"SlurmctldHost={controller.name}({controller.address})", "SlurmUser=root",
            "AuthType=auth/munge", f"AuthInfo=socket={r / 'munge' / 'munge.socket.2'}",
            # %n: the node's name, so that the slurmds of one machine keep apart
            f"StateSaveLocation={r / 'state'}", f"SlurmdSpoolDir={r / 'spool-%n'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}", f"SlurmdPidFile={r / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={r / 'slurmctld.log'}", f"SlurmdLogFile={r / 'slurmd-%n.log'}",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core", "ReturnToService=2", "MpiDefault=none",
            "JobAcctGatherType=jobacct_gather/none", "MinJobAge=300", "KillWait=30",
            # a requeued job made eligible waits for the scheduler's next pass (60 s by default)
            "SchedulerParameters=sched_interval=2",
            # a node whose slurmd died is DOWN after this (300 s by default), ending its part of a job
            "SlurmdTimeout=15",
            # RealMemory a GiB under what slurmd sees, or the node drains as "low RealMemory"
            *[f"NodeName={h.name} NodeAddr={h.address} {' '.join(hardware)} RealMemory={max(memory - 1024, 512)}"
              for h in self.hosts],
            f"PartitionName=debug Nodes={','.join(h.name for h in self.hosts)} Default=YES State=UP MaxTime=INFINITE",
            ""])

    def stop(self) -> None:
        """Cancel every job, then stop each daemon this cluster started, by process id."""
        if (self.root / "slurm.conf").exists():
            self.run("scancel", "-u", "root")
            try:
                self._wait_until(lambda: not self.run("squeue", "-h").stdout.strip(), 60, "the queue to empty")
            except TimeoutError:
                pass  # the daemons go down anyway
        slurmds = [self.root / f"slurmd-{h.name}.pid" for h in self.hosts]
        for pid_file in [*slurmds, self.root / "slurmctld.pid", self.root / "munged.pid"]:
            if pid_file.is_file():
                _kill(int(pid_file.read_text().split()[0]))

    def run(self, *command: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """`command` on the first host (where slurmctld listens), with this cluster's SLURM_CONF."""
        return subprocess.run(self.hosts[0].enter(*command), capture_output=True, text=True, env=self.env,
                              timeout=timeout)

    def job_field(self, job_id: str, field: str) -> str:
        out = self.run("scontrol", "show", "job", job_id).stdout
        return next((w.split("=", 1)[1] for w in out.split() if w.startswith(f"{field}=")), "")

    def wait_for_state(self, job_id: str, states: set[str], timeout: float) -> str:
        """Poll (faster than `sbatch --wait`'s back-off) until the job is in one of `states`."""
        self._wait_until(lambda: self.job_field(job_id, "JobState") in states, timeout, f"job {job_id} to reach {states}")
        return self.job_field(job_id, "JobState")

    def daemon_logs(self, lines: int = 15) -> str:
        """The last lines of slurmctld's and each slurmd's log, for failure messages."""
        logs = [self.root / "slurmctld.log", *(self.root / f"slurmd-{h.name}.log" for h in self.hosts)]
        return "\n".join(f"--- {log.name}:\n" + "\n".join(log.read_text().splitlines()[-lines:])
                         for log in logs if log.is_file())

    def _check(self, command: list[str]) -> subprocess.CompletedProcess:
        done = subprocess.run(command, capture_output=True, text=True, env=self.env, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed: {done.stderr.strip()}; see the logs in {self.root}")
        return done

    @staticmethod
    def _wait_until(condition, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {timeout:.0f} s for {what}")
            time.sleep(0.5)


def _kill(pid: int, timeout: float = 15) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            os.kill(pid, 0)
            time.sleep(0.2)
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def namespace_hosts(cluster: NetnsCluster) -> list[Host]:
    """The nodes of a namespace cluster as SLURM hosts: slurmctld in node1, a slurmd in each node at
    its own address; daemons and jobs enter only the node's network (`Node.command_keeping_sys`)."""
    return [Host(n.hostname, n.address, n.command_keeping_sys) for n in cluster.nodes]


def started_cluster(root: Path, hosts: list[Host] | None = None) -> Iterator[SlurmCluster]:
    """A module fixture's body: a started cluster (one host by default), stopped afterwards; the
    tests skip, printing why, where SLURM cannot be had."""
    import pytest

    reason = unavailable_reason()
    if reason:
        print(f"no SLURM cluster: {reason}")
        pytest.skip(reason)
    cluster = SlurmCluster(root, hosts)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
