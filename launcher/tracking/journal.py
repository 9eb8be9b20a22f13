"""The tracking journal: every MLflow call of a run, one JSON line each, on disk before MLflow sees it.

`<train.output_dir>/tracking/<key>.jsonl`, where `<key>` is the run's tracking key
(launcher/tracking/tracker.py). One writer at a time appends to it, flushed to the OS per record:
rank 0's training thread, or after training `ithaca eval --mlflow` (launcher/eval/mlflow_report.py,
which holds the journal's push lock while it writes); pushers read it (launcher/tracking/push.py).
Records, in the order of the calls:

    {"kind": "start", "time_ms", "uri", "experiment", "run_name", "artifact_location", "resumed"}
    {"kind": "params", "values": {name: str}}
    {"kind": "text", "path": "config.yaml", "text": str}
    {"kind": "metrics", "step": int, "time_ms": int, "values": {name: float}}
    {"kind": "artifact", "path": "eval/passkey.png", "file": "<key>.files/<id>/passkey.png"}
    {"kind": "end", "time_ms", "status": "FINISHED" | "FAILED" | "KILLED"}

An artifact's `path` is its place in the MLflow run, and `file` (relative to the journal's folder)
a copy of the file as it was when journaled, written and fsynced before its record: a later version
of the same file gets its own copy, so a push, however late, sends the bytes of the record's time.

A process killed mid-write leaves a torn last line; the next writer cuts it off, and readers only
ever take lines that end in a newline.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

JOURNAL_DIR = "tracking"


def journal_path(output_dir: str | Path, key: str) -> Path:
    return Path(output_dir) / JOURNAL_DIR / f"{key}.jsonl"


def find_journals(output_dir: str | Path) -> list[Path]:
    """Every run's journal in a run's output folder (one per MLflow run started there)."""
    return sorted((Path(output_dir) / JOURNAL_DIR).glob("*.jsonl"))


def newest_run_key(output_dir: str | Path) -> str | None:
    """The run key of the journal written last in a run's output folder, if any."""
    journals = find_journals(output_dir)
    return max(journals, key=lambda p: p.stat().st_mtime).stem if journals else None


class Journal:
    """The writer of one journal; opening an existing one (a resume) continues it."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.last_step = _cut_torn_line_and_find_last_step(path)
        """The highest step journaled before this writer opened it (0: none)."""
        self._file = path.open("a", encoding="utf-8")

    def append(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")  # NaN/inf are written as NaN/Infinity, which json reads back
        self._file.flush()  # to the OS, not to the disk: the pusher fsyncs off the training thread

    def start(self, *, uri: str, experiment: str, run_name: str | None, artifact_location: str | None,
              resumed: bool) -> None:
        self.append({"kind": "start", "time_ms": _now_ms(), "uri": uri, "experiment": experiment,
                     "run_name": run_name, "artifact_location": artifact_location, "resumed": resumed})

    def params(self, values: dict[str, str]) -> None:
        self.append({"kind": "params", "values": values})

    def text(self, artifact_path: str, text: str) -> None:
        self.append({"kind": "text", "path": artifact_path, "text": text})

    def metrics(self, step: int, values: dict[str, float]) -> None:
        self.append({"kind": "metrics", "step": step, "time_ms": _now_ms(),
                     "values": {k: float(v) for k, v in values.items()}})

    def end(self, status: str) -> None:
        self.append({"kind": "end", "time_ms": _now_ms(), "status": status})

    def append_file(self, artifact_path: str, source: Path) -> None:
        """Journal `source` as the run's artifact `artifact_path` (e.g. "eval/passkey.png"): a copy
        beside the journal first, then its record."""
        # a folder per copy: MLflow names an uploaded file by its local name, which must be the artifact's
        copy = self.path.with_suffix(".files") / uuid.uuid4().hex / Path(artifact_path).name
        copy.parent.mkdir(parents=True)
        partial = copy.with_name(f".{copy.name}.partial")
        with source.open("rb") as src, partial.open("wb") as dst:
            shutil.copyfileobj(src, dst)
            dst.flush()
            os.fsync(dst.fileno())  # on disk before the record that names it (the pusher fsyncs the journal)
        os.replace(partial, copy)
        self.append({"kind": "artifact", "path": artifact_path, "file": str(copy.relative_to(self.path.parent))})

    def close(self) -> None:
        self._file.close()


def _now_ms() -> int:
    return int(time.time() * 1000)


def _cut_torn_line_and_find_last_step(path: Path) -> int:
    if not path.exists():
        return 0
    data = path.read_bytes()
    complete = data[:data.rfind(b"\n") + 1]
    if len(complete) < len(data):
        with path.open("r+b") as f:
            f.truncate(len(complete))
    steps = (json.loads(line).get("step", 0) for line in complete.splitlines())
    return max(steps, default=0)


def durable_records(path: Path, offset: int) -> Iterator[tuple[dict, int]]:
    """The complete records from byte `offset` on, each with the byte offset just after it.

    The file is fsynced first, so what a pusher sends to MLflow is on disk: a machine crash cannot
    keep a step in MLflow that the journal lost, which the resumed run would then log again."""
    with path.open("rb") as f:
        os.fsync(f.fileno())
        f.seek(offset)
        for line in f:
            if not line.endswith(b"\n"):
                return  # being written now; the next read takes it
            offset += len(line)
            yield json.loads(line), offset


def count_records(path: Path, offset: int) -> int:
    """Complete records from byte `offset` on."""
    with path.open("rb") as f:
        f.seek(offset)
        return f.read().count(b"\n")
