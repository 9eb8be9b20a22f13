"""A real `mlflow server` on localhost that a test can stop and start again on the same port and store."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from harness import free_port


class MlflowServer:
    """`mlflow server` with its SQLite store and artifacts under `root`; `url` is fixed across restarts."""

    def __init__(self, root: Path):
        self.root = root
        self.url = f"http://127.0.0.1:{free_port()}"
        self._proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> None:
        """Start it and wait until it answers /health."""
        port = self.url.rsplit(":", 1)[1]
        log = self.root / "server.log"
        with log.open("a") as out:  # a file, not a pipe that nobody reads and that would fill
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", port,
                 "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}",
                 "--artifacts-destination", str(self.root / "artifacts"), "--workers", "1"],
                cwd=self.root, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                pass
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"mlflow server did not come up: {log.read_text()[-2000:]}")
            time.sleep(0.5)

    def stop(self) -> None:
        """Stop it and its workers (they share its process group)."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGTERM)
            try:
                self._proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait()
        self._proc = None
