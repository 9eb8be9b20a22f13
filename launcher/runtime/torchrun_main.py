"""torchrun as Ithaca starts it (from `ithaca train` and from SLURM jobs):
`python -m ithaca.launcher.runtime.torchrun_main [--checkpoint-dir DIR] [--parent-pid PID] -- TORCHRUN_ARGS...`

Four things over plain `torch.distributed.run`:
- with --parent-pid it dies with its parent (`ithaca train`): killed outright, that parent would
  otherwise leave torchrun and its ranks training on. The parent-death signal is SIGTERM, which
  torchrun hands to its ranks: they checkpoint at the step boundary and stop.
- a rank that fails ends the job with one line naming the rank, how it died and the checkpoint
  to continue from (a training run's --checkpoint-dir), instead of torchrun's table (the ranks' own errors are above it in the log).
  With `--max-restarts K` torchrun restarts every rank first, K times; the restarted ranks resume
  from the latest complete checkpoint (launcher/cli/main.py, TORCHELASTIC_RESTART_COUNT).
- a node cut off from the rendezvous host does not outlive the run. torchrun's agent there asks
  the rendezvous store (on the host it can no longer reach) how many nodes wait, between its
  checks of the ranks, and that call blocks far longer than `--rdzv-conf read_timeout` (measured
  with a cut link: the rank gone by `train.collective_timeout`, left uncollected, and the agent
  still blocked there 80 s later with read_timeout=10, over 2 minutes with the default 60). A
  guard thread (`FailedRankGuard`) sees a rank of this node that failed and that the agent, blocked
  in the rendezvous, has not collected within AGENT_STUCK_SECONDS: it prints the failure line and
  ends this node's processes.
- a node can join a later rendezvous round (a lost node that comes back, so that an elastic job
  grows again). torch 2.13's c10d rendezvous shares its agent's store with the ranks and publishes
  that store's address (MASTER_ADDR, MASTER_PORT) in the first round's keys only: a node new in a
  later round looks for them in that round's keys and waits forever (dynamic_rendezvous.py,
  `next_rendezvous`: rank 0 skips `RendezvousStoreInfo.build` once `_bootstrap_store_info` is cached;
  rendezvous/api.py `build`: `store.get(MASTER_ADDR_KEY)`). TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
  (set here unless the user set it) makes rank 0's agent publish an address in every round, where
  rank 0 of the ranks hosts their store (launcher/runtime/distributed.py).
Start every node of a multi-node job this way:
`python -m ithaca.launcher.runtime.torchrun_main --checkpoint-dir DIR -- TORCHRUN_ARGS...`.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import psutil

from ithaca.launcher.runtime.process_lifetime import die_with_parent
from ithaca.launcher.runtime.supervisor import kill_descendants

FAILED = 1
# A healthy agent collects a failed rank within its monitor interval (0.1 s) and one store call;
# this is long enough for a loaded machine and short beside any collective_timeout.
AGENT_STUCK_SECONDS = 10.0
_RENDEZVOUS = os.sep.join(("torch", "distributed", "elastic", "rendezvous"))
UNSHARED_STORE = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ithaca.launcher.runtime.torchrun_main")
    parser.add_argument("--checkpoint-dir", type=Path, help="a training run's checkpoint folder (named when a rank fails)")
    parser.add_argument("--parent-pid", type=int, help="stop (SIGTERM to the ranks) when this parent exits")
    parser.add_argument("torchrun_args", nargs=argparse.REMAINDER, help="after --: torchrun's arguments")
    return parser


def describe_failure(rank: int, exitcode: int, pid: int, checkpoint_dir: Path | None,
                     stopped: str = "the job stopped") -> str:
    """One line: which rank died, how, what `stopped`, and what a resume would continue from."""
    how = f"was killed by {signal.Signals(-exitcode).name}" if exitcode < 0 else f"exited with code {exitcode}"
    from ithaca.launcher.checkpoint.format import LATEST

    if checkpoint_dir is None:
        return f"ithaca: rank {rank} (pid {pid}) {how}, and {stopped}"
    pointer = checkpoint_dir / LATEST
    if pointer.is_file():
        resume = (f"the last complete checkpoint is {checkpoint_dir / pointer.read_text().strip()}; continue "
                  "from it with --resume auto")
    else:
        resume = f"no checkpoint was completed in {checkpoint_dir}: a new run starts from step 0"
    return f"ithaca: rank {rank} (pid {pid}) {how}, and {stopped}; {resume}"


def _failure_code(pid: int) -> int | None:
    """A child's exit code (-N: killed by signal N) if it ended in failure and is not yet collected;
    None while it runs, after a success, or once collected. It stays uncollected (WNOWAIT): the
    agent still owns it."""
    try:
        ended = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return None
    if ended is None:
        return None
    if ended.si_code == os.CLD_EXITED:
        return ended.si_status or None
    return -ended.si_status


def _agent_in_rendezvous() -> bool:
    """Whether torchrun's agent (this process's main thread) is inside a rendezvous call now."""
    frame = sys._current_frames().get(threading.main_thread().ident)
    while frame is not None:
        if _RENDEZVOUS in frame.f_code.co_filename:
            return True
        frame = frame.f_back
    return False


def _rank_of(process: psutil.Process) -> int | None:
    try:
        rank = process.environ().get("RANK")
    except psutil.Error:
        return None
    return None if rank is None else int(rank)


class FailedRankGuard:
    """Ends this node when a rank here failed and torchrun's agent, blocked in the rendezvous, has not
    collected it in `limit` s. An agent busy otherwise (stopping the other ranks, which may take its
    --shutdown-timeout) is left to it."""

    def __init__(self, checkpoint_dir: Path | None, limit: float = AGENT_STUCK_SECONDS, poll: float = 1.0):
        self._checkpoint_dir, self._limit, self._poll = checkpoint_dir, limit, poll
        self._ranks: dict[int, int] = {}  # pid -> rank, read from a live rank's environment
        self._failed_since: dict[int, float] = {}
        threading.Thread(target=self._watch, name="ithaca-failed-rank-guard", daemon=True).start()

    def _watch(self) -> None:
        while True:
            time.sleep(self._poll)
            for child in psutil.Process().children():
                if child.pid not in self._ranks:
                    rank = _rank_of(child)
                    if rank is not None:
                        self._ranks[child.pid] = rank
                    continue
                code = _failure_code(child.pid)
                if code is None or not _agent_in_rendezvous():
                    self._failed_since.pop(child.pid, None)
                    continue
                since = self._failed_since.setdefault(child.pid, time.monotonic())
                if time.monotonic() - since > self._limit:
                    self._stop_node(self._ranks[child.pid], code, child.pid)

    def _stop_node(self, rank: int, code: int, pid: int) -> None:
        stopped = (f"this node's processes are stopped (torchrun's agent on {socket.gethostname()} waited "
                   f"{self._limit:g} s on the rendezvous store, out of reach, without acting on it)")
        print(describe_failure(rank, code, pid, self._checkpoint_dir, stopped), file=sys.stderr, flush=True)
        kill_descendants()
        os._exit(FAILED)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.parent_pid is not None:
        die_with_parent(signal.SIGTERM, args.parent_pid)
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    FailedRankGuard(args.checkpoint_dir)
    os.environ.setdefault(UNSHARED_STORE, "1")
    torchrun_args = args.torchrun_args[1:] if args.torchrun_args[:1] == ["--"] else args.torchrun_args
    try:
        run(parse_args(torchrun_args))
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        print(describe_failure(rank, failure.exitcode, failure.pid, args.checkpoint_dir), file=sys.stderr)
        return FAILED
    except SignalException as err:  # torchrun has handed the signal to its ranks and waited for them
        print(f"ithaca: torchrun got {err.sigval.name}; its ranks were asked to checkpoint and stop",
              file=sys.stderr)
        return 128 + int(err.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
