"""`ithaca train` owns the processes it starts: none of them outlives the command.

torchrun runs in a session of its own, so a Ctrl-C in the terminal reaches `ithaca train` alone,
which decides what every process does:
- the first stop signal (SIGINT, SIGTERM or SIGUSR1: launcher/runtime/preemption.py's STOP_SIGNALS)
  is handed to every rank; the ranks agree on the step, checkpoint at its end and stop, and
  torchrun then exits by itself;
- a second one kills every process of the run at once (SIGKILL): no checkpoint of the step.
`ithaca train` is a child subreaper (launcher/runtime/process_lifetime.py), so ranks whose torchrun died and
loader workers whose rank died become its children: once torchrun has exited, what is left gets
`grace` seconds to finish (ranks orphaned by a killed torchrun are checkpointing: their
parent-death signal asked them to stop) and is then killed. torchrun itself dies with us.

A rank the kernel's out-of-memory killer ends shows in torchrun's report as killed by SIGKILL; when
the run fails and this process's memory cgroup counted OOM kills meanwhile (cgroup v2 memory.events,
v1 memory.oom_control: `oom_kill`), one more line says so.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import psutil

from ithaca.launcher.runtime.preemption import STOP_SIGNALS
from ithaca.launcher.runtime.process_lifetime import become_subreaper


class _Owner:
    """The signal handler's state: how many stop signals came, and the first one."""

    def __init__(self, torchrun: subprocess.Popen):
        self.torchrun = torchrun
        self.first: signal.Signals | None = None
        self.killed = False

    def handle(self, signum: int, frame) -> None:
        if self.first is None:
            self.first = signal.Signals(signum)
            self._hand_to_ranks(self.first)
            print(f"ithaca: {self.first.name}: every rank checkpoints at the end of its step and stops; "
                  f"send it again (Ctrl-C) to stop at once without a checkpoint", file=sys.stderr, flush=True)
        elif not self.killed:
            self.killed = True
            kill_descendants()
            print("ithaca: stopped at once; the step under way was not saved", file=sys.stderr, flush=True)

    def _hand_to_ranks(self, signum: signal.Signals) -> None:
        """To torchrun's children (the ranks); before it has started any, to torchrun (which stops)."""
        try:
            ranks = psutil.Process(self.torchrun.pid).children()
        except psutil.NoSuchProcess:  # torchrun is gone: orphaned ranks are our children now
            ranks = psutil.Process().children()
        for process in ranks or [psutil.Process(self.torchrun.pid)]:
            try:
                process.send_signal(signum)
            except psutil.NoSuchProcess:
                pass


def kill_descendants() -> None:
    """SIGKILL to every process below this one, then reap them."""
    left = psutil.Process().children(recursive=True)
    for process in left:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(left, timeout=10)


def oom_kills(proc: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Processes of this process's memory cgroup the OOM killer has killed so far; None where neither
    cgroup v2's memory.events nor v1's memory.oom_control can be read."""
    try:
        lines = proc.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "memory":
            counters = root / "memory" / path.lstrip("/") / "memory.oom_control"
        elif controllers == "":
            counters = root / path.lstrip("/") / "memory.events"
        else:
            continue
        try:
            fields = dict(row.split() for row in counters.read_text().splitlines() if row.strip())
        except (OSError, ValueError):
            continue
        if "oom_kill" in fields:
            return int(fields["oom_kill"])
    return None


def report_oom_kills(before: int | None, after: int | None) -> None:
    if before is not None and after is not None and after > before:
        print(f"ithaca: the kernel's out-of-memory killer killed {after - before} process(es) of this run while it "
              "ran: a rank reported killed by SIGKILL ran out of memory; `ithaca plan --config ...` predicts each "
              "rank's peak and the layouts that fit", file=sys.stderr)


def run_owned(cmd: list[str], env: dict[str, str], *, grace: float) -> int:
    """Run `cmd` (torchrun) and every process it starts to the end; returns its exit code, or
    128 + the signal number when a stop signal ended the run."""
    become_subreaper()
    oom_before = oom_kills()
    torchrun = subprocess.Popen(cmd, env=env, start_new_session=True)
    owner = _Owner(torchrun)
    previous = {s: signal.signal(s, owner.handle) for s in STOP_SIGNALS}
    try:
        code = torchrun.wait()
        _finish_leftovers(grace)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if code != 0:
        report_oom_kills(oom_before, oom_kills())
    if owner.first is not None:
        return 128 + int(owner.first)
    if code < 0:  # killed from outside: its ranks got their parent-death signal (and were waited for above)
        print(f"ithaca: torchrun was killed by {signal.Signals(-code).name}; its ranks were asked to checkpoint "
              "and stop", file=sys.stderr)
        return 128 - code
    return code


def _finish_leftovers(grace: float) -> None:
    """Wait up to `grace` s for the descendants torchrun left behind, then kill the rest."""
    left = psutil.Process().children(recursive=True)
    if left:
        _, alive = psutil.wait_procs(left, timeout=grace)
        if alive:
            print(f"ithaca: {len(alive)} process(es) of the run still running {grace:.0f} s after torchrun "
                  f"exited (pids {', '.join(str(p.pid) for p in alive)}); killing them", file=sys.stderr)
            kill_descendants()
