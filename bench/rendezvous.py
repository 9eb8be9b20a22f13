"""Where a benchmark's processes meet: a port the system says is free, not one derived from the pid."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the system picks it). A port derived from
    the pid can already be taken, by another job or a benchmark's previous world in TIME_WAIT."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
