"""The lifetime of the loader's worker processes.

Schedulers send SIGTERM/SIGUSR1 to every process of a job. The training process decides when to
stop (after a checkpoint), so its workers ignore both signals: dying first, they would make torch
raise in the training process before it has saved anything.

The price: at exit the interpreter stops daemon processes with SIGTERM, then waits for them, so
a loader still open then (an uncaught exception in training keeps it alive in the traceback)
would make the process wait forever instead of exiting with the error. Open loaders are
therefore closed by an exit hook of their own, which asks the workers to finish.
"""

from __future__ import annotations

import atexit
import signal
import weakref
from typing import Protocol


class Closable(Protocol):
    def close(self) -> None: ...


_open: weakref.WeakSet[Closable] = weakref.WeakSet()


def ignore_stop_signals(worker_id: int) -> None:
    """A DataLoader worker_init_fn: the worker outlives SIGTERM/SIGUSR1 sent to the whole job."""
    for signum in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)


def close_at_exit(loader: Closable) -> None:
    """Closes `loader` at exit if it is still open then; call it once its workers have started.

    Exit hooks run last registered first, and this one must run before multiprocessing's (which
    waits for the workers) and torch's (which disables its own worker shutdown), both registered
    by then; re-registering keeps it in front of hooks added since."""
    _open.add(loader)
    atexit.unregister(_close_open_loaders)
    atexit.register(_close_open_loaders)


def forget(loader: Closable) -> None:
    """`loader` was closed: nothing to do for it at exit."""
    _open.discard(loader)


def _close_open_loaders() -> None:
    for loader in list(_open):
        loader.close()
