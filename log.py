"""Rank-aware logging: `log = get_logger(__name__)`; rank 0 speaks unless `all_ranks=True`.

Lines are tagged `[r<rank>]`. The rank is read from the environment torchrun sets, so this
module needs no process group and imports nothing from the rest of Ithaca.
"""

from __future__ import annotations

import logging
import os
import sys

_warned: set[str] = set()


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


class _RankFilter(logging.Filter):
    def __init__(self, all_ranks: bool):
        super().__init__()
        self.all_ranks = all_ranks

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = rank()
        return self.all_ranks or record.rank == 0


def get_logger(name: str, *, all_ranks: bool = False) -> logging.Logger:
    """A logger that prints `[r<rank>] message` to stderr, on rank 0 only by default."""
    logger = logging.getLogger(name if not all_ranks else f"{name}.all_ranks")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[r%(rank)s] %(message)s"))
        handler.addFilter(_RankFilter(all_ranks))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


def warn_once(logger: logging.Logger, message: str) -> None:
    """Log `message` as a warning the first time it is seen in this process."""
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)
