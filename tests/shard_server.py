"""An HTTP server of one shard folder, with faults on request, for the remote-shard tests.

`python tests/shard_server.py FOLDER PORT [--drop NAME ...] [--corrupt NAME ...]` (or `ShardServer`
in-process): GET /NAME answers FOLDER/NAME. A name given to --drop has its first answer cut after
half its bytes (the full Content-Length announced, then the connection closed); a name given to
--corrupt is always served with its last byte changed. Each request is printed to stdout.
"""

from __future__ import annotations

import argparse
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class ShardServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, folder: Path, port: int, *, drop: set[str] = frozenset(), corrupt: set[str] = frozenset(),
                 host: str = "127.0.0.1"):
        super().__init__((host, port), _Handler)
        self.folder, self.to_drop, self.corrupt = Path(folder), set(drop), set(corrupt)
        self.requests: list[str] = []
        self._lock = threading.Lock()

    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


class _Handler(BaseHTTPRequestHandler):
    server: ShardServer

    def do_GET(self) -> None:
        name = self.path.lstrip("/")
        path = self.server.folder / name
        with self.server._lock:
            self.server.requests.append(name)
            drop = name in self.server.to_drop
            self.server.to_drop.discard(name)
        print(f"GET {name}{' (dropped mid-file)' if drop else ''}", flush=True)
        if "/" in name or not path.is_file():
            self.send_error(404)
            return
        body = path.read_bytes()
        if name in self.server.corrupt:
            body = body[:-1] + bytes([body[-1] ^ 1])
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[:len(body) // 2] if drop else body)
        if drop:
            self.close_connection = True

    def log_message(self, format: str, *args) -> None:  # requests are printed in do_GET
        pass


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", type=Path)
    parser.add_argument("port", type=int)
    parser.add_argument("--drop", action="append", default=[])
    parser.add_argument("--corrupt", action="append", default=[])
    args = parser.parse_args()
    server = ShardServer(args.folder, args.port, drop=set(args.drop), corrupt=set(args.corrupt), host="0.0.0.0")
    print(f"serving {args.folder} on port {args.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
