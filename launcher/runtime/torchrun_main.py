"""torchrun as Ithaca starts it (from `ithaca train` and from SLURM jobs):
`python -m ithaca.launcher.runtime.torchrun_main [--checkpoint-dir DIR] [--parent-pid PID] -- TORCHRUN_ARGS...`

Two things over plain `torch.distributed.run`:
- with --parent-pid it dies with its parent (`ithaca train`): killed outright, that parent would
  otherwise leave torchrun and its ranks training on. The parent-death signal is SIGTERM, which
  torchrun hands to its ranks: they checkpoint at the step boundary and stop.
- a rank that fails ends the job with one line naming the rank, how it died and the checkpoint
  to continue from (a training run's --checkpoint-dir), instead of torchrun's table (the ranks' own errors are above it in the log).
  With `--max-restarts K` torchrun restarts every rank first, K times; the restarted ranks resume
  from the latest complete checkpoint (launcher/cli/main.py, TORCHELASTIC_RESTART_COUNT).
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from ithaca.launcher.runtime.process_lifetime import die_with_parent

FAILED = 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ithaca.launcher.runtime.torchrun_main")
    parser.add_argument("--checkpoint-dir", type=Path, help="a training run's checkpoint folder (named when a rank fails)")
    parser.add_argument("--parent-pid", type=int, help="stop (SIGTERM to the ranks) when this parent exits")
    parser.add_argument("torchrun_args", nargs=argparse.REMAINDER, help="after --: torchrun's arguments")
    return parser


def describe_failure(rank: int, exitcode: int, pid: int, checkpoint_dir: Path | None) -> str:
    """One line: which rank died, how, and what a resume would continue from."""
    how = f"was killed by {signal.Signals(-exitcode).name}" if exitcode < 0 else f"exited with code {exitcode}"
    from ithaca.launcher.checkpoint.format import LATEST

    if checkpoint_dir is None:
        return f"ithaca: rank {rank} (pid {pid}) {how}, and the job stopped"
    pointer = checkpoint_dir / LATEST
    if pointer.is_file():
        resume = (f"the last complete checkpoint is {checkpoint_dir / pointer.read_text().strip()}; continue "
                  "from it with --resume auto")
    else:
        resume = f"no checkpoint was completed in {checkpoint_dir}: a new run starts from step 0"
    return f"ithaca: rank {rank} (pid {pid}) {how}, and the job stopped; {resume}"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.parent_pid is not None:
        die_with_parent(signal.SIGTERM, args.parent_pid)
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

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
