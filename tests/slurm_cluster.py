"""A real one-node SLURM cluster (slurmctld + slurmd + munged on localhost) for the submit tests.

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
from pathlib import Path

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


class SlurmCluster:
    def __init__(self, root: Path):
        self.root = root
        self.host = socket.gethostname().split(".")[0]
        self.env = {**os.environ, "SLURM_CONF": str(root / "slurm.conf")}
        self._pid_files = [root / "munged.pid", root / "slurmctld.pid", root / "slurmd.pid"]

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
        self._check(["slurmctld"])
        self._check(["slurmd"])
        self._wait_until(lambda: "idle" in self.run("sinfo", "-h", "-o", "%T").stdout, 30, "the node to be idle")

    def _slurm_conf(self) -> str:
        r = self.root
        node = self._check(["slurmd", "-C"]).stdout.splitlines()[0].split()
        memory = next(int(f.split("=")[1]) for f in node if f.startswith("RealMemory="))
        node = [f for f in node if not f.startswith(("NodeName=", "RealMemory="))]
        return "\n".join([
            "ClusterName=ithaca-test", f"SlurmctldHost={self.host}(127.0.0.1)", "SlurmUser=root",
            "AuthType=auth/munge", f"AuthInfo=socket={r / 'munge' / 'munge.socket.2'}",
            f"StateSaveLocation={r / 'state'}", f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}", f"SlurmdPidFile={r / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'slurmctld.log'}", f"SlurmdLogFile={r / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core", "ReturnToService=2", "MpiDefault=none",
            "JobAcctGatherType=jobacct_gather/none", "MinJobAge=300", "KillWait=30",
            # RealMemory a GiB under what slurmd sees, or the node drains as "low RealMemory"
            f"NodeName={self.host} NodeAddr=127.0.0.1 {' '.join(node)} RealMemory={max(memory - 1024, 512)}",
            f"PartitionName=debug Nodes={self.host} Default=YES State=UP MaxTime=INFINITE", ""])

    def stop(self) -> None:
        """Cancel every job, then stop each daemon this cluster started, by process id."""
        if (self.root / "slurm.conf").exists():
            self.run("scancel", "-u", "root")
            try:
                self._wait_until(lambda: not self.run("squeue", "-h").stdout.strip(), 60, "the queue to empty")
            except TimeoutError:
                pass  # the daemons go down anyway
        for pid_file in reversed(self._pid_files):
            if pid_file.is_file():
                _kill(int(pid_file.read_text().split()[0]))

    def run(self, *command: str) -> subprocess.CompletedProcess:
        return subprocess.run(command, capture_output=True, text=True, env=self.env, timeout=60)

    def job_field(self, job_id: str, field: str) -> str:
        out = self.run("scontrol", "show", "job", job_id).stdout
        return next((w.split("=", 1)[1] for w in out.split() if w.startswith(f"{field}=")), "")

    def wait_for_state(self, job_id: str, states: set[str], timeout: float) -> str:
        """Poll (faster than `sbatch --wait`'s back-off) until the job is in one of `states`."""
        self._wait_until(lambda: self.job_field(job_id, "JobState") in states, timeout, f"job {job_id} to reach {states}")
        return self.job_field(job_id, "JobState")

    def daemon_logs(self, lines: int = 15) -> str:
        """The last lines of slurmctld's and slurmd's logs, for failure messages."""
        return "\n".join(f"--- {name}:\n" + "\n".join((self.root / name).read_text().splitlines()[-lines:])
                         for name in ("slurmctld.log", "slurmd.log") if (self.root / name).is_file())

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
