"""Input that `ithaca prep` cannot read as text, and the record of what `--on-error skip` left out.

A bad input is a whole file (unreadable, corrupt gzip, binary, not UTF-8) or one JSONL line (not
UTF-8, not JSON, no string `--field`). `--on-error stop` (the default) ends the prep with one line
naming it; `skip` leaves it out and counts it in manifest.json under "skipped".
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from ithaca.data.shards import MANIFEST

OnError = Literal["stop", "skip"]
ON_ERROR_CHOICES: tuple[OnError, ...] = ("stop", "skip")

MAX_LISTED = 100
"""Bad inputs named one by one in manifest.json and the log; past this they are only counted,
so a binary file mistaken for JSONL cannot grow the manifest by one entry per line."""


@dataclass(frozen=True)
class BadInput:
    kind: Literal["unreadable", "gzip", "binary", "utf8", "json", "field"]
    path: str
    line: int | None
    """The JSONL line (1-based); None when the whole file is bad."""
    reason: str

    def __str__(self) -> str:
        where = self.path if self.line is None else f"{self.path}:{self.line}"
        return f"{where}: {self.reason}"

    def stop_message(self) -> str:
        return f"{self}; fix it or pass --on-error skip"


@dataclass
class SkipLog:
    """What `--on-error skip` left out: totals, counts per kind, and the first MAX_LISTED inputs."""

    files: int = 0
    lines: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    listed: list[BadInput] = field(default_factory=list)

    def add(self, bad: BadInput) -> bool:
        """Count `bad`; returns whether it was listed (False once MAX_LISTED are)."""
        if bad.line is None:
            self.files += 1
        else:
            self.lines += 1
        self.by_kind[bad.kind] = self.by_kind.get(bad.kind, 0) + 1
        if len(self.listed) < MAX_LISTED:
            self.listed.append(bad)
            return True
        return False

    def summary(self) -> str:
        if not self.files + self.lines:
            return "skipped nothing"
        kinds = ", ".join(f"{kind}={n}" for kind, n in sorted(self.by_kind.items()))
        return f"skipped {self.files} file(s) and {self.lines} JSONL line(s) ({kinds})"

    def to_json(self) -> dict:
        return {"files": self.files, "lines": self.lines, "by_kind": self.by_kind,
                "listed": [asdict(b) for b in self.listed],
                "unlisted": self.files + self.lines - len(self.listed)}

    @classmethod
    def from_json(cls, raw: dict) -> SkipLog:
        return cls(raw["files"], raw["lines"], dict(raw["by_kind"]), [BadInput(**b) for b in raw["listed"]])


def read_skip_log(folder: Path) -> SkipLog:
    """The "skipped" record of a finished prep's manifest.json."""
    return SkipLog.from_json(json.loads((Path(folder) / MANIFEST).read_text())["skipped"])
