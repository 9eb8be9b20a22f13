"""Shard format: webdataset tars of documents (token ids) plus manifest.json describing them.

Each sample is one document: `{"__key__": "<doc index>", "tokens.npy": int array}`. The manifest
names every shard with its document and token counts and sha256, and the tokenizer's identity.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ithaca.data.remote import is_remote, location_text, read_remote, shard_folder

MANIFEST = "manifest.json"
FORMAT = "ithaca-shards/1"


@dataclass(frozen=True)
class ShardInfo:
    name: str
    documents: int
    tokens: int
    """Document tokens, not counting the EOS the loader puts after each document."""
    sha256: str


@dataclass(frozen=True)
class Manifest:
    tokenizer: dict
    shards: list[ShardInfo]
    holdout: dict | None = None
    """`ithaca prep --holdout`'s eval set: {"path": its folder relative to this one, "documents": N};
    those documents are in no shard listed here."""

    @property
    def documents(self) -> int:
        return sum(s.documents for s in self.shards)

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.shards)

    def to_json(self) -> str:
        holdout = {} if self.holdout is None else {"holdout": self.holdout}
        return json.dumps({"format": FORMAT, "tokenizer": self.tokenizer, "documents": self.documents,
                           "tokens": self.tokens, "shards": [vars(s) for s in self.shards], **holdout}, indent=1)


def read_manifest(folder: str | Path) -> Manifest:
    """Read and check a shard folder's manifest (not its shards); raises ValueError naming what is wrong.
    `folder` may be remote (data/remote.py): the manifest is read from the same place."""
    text = _remote_manifest_text(folder) if is_remote(folder) else _local_manifest_text(Path(folder))
    folder = shard_folder(folder)
    try:
        raw = json.loads(text)
        manifest = Manifest(tokenizer=raw["tokenizer"], shards=[ShardInfo(**s) for s in raw["shards"]],
                            holdout=raw.get("holdout"))
        if raw.get("format") != FORMAT:
            raise ValueError(f"format {raw.get('format')!r}")
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"data.path={str(folder)!r}: {MANIFEST} is not an Ithaca manifest ({err}); "
                         "re-run `ithaca prep`") from None
    if not manifest.shards or manifest.tokens == 0:
        raise ValueError(f"data.path={str(folder)!r}: the manifest lists no tokens; prep some input")
    return manifest


def _local_manifest_text(folder: Path) -> str:
    if not folder.is_dir():
        raise ValueError(f"data.path={str(folder)!r}: no such folder; write shards with `ithaca prep --output {folder}`")
    if not (folder / MANIFEST).is_file():
        raise ValueError(f"data.path={str(folder)!r}: no {MANIFEST} (empty or unfinished); "
                         f"write shards with `ithaca prep --output {folder}`")
    return (folder / MANIFEST).read_text()


def _remote_manifest_text(folder: str | Path) -> str:
    try:
        return read_remote(folder, MANIFEST).decode()
    except OSError as err:  # NotFound included
        raise ValueError(f"data.path={location_text(folder)!r}: cannot read {MANIFEST} ({err}); check the address, "
                         f"and that `ithaca prep`'s output folder is served there") from None


def missing_shards(folder: str | Path, manifest: Manifest) -> list[str]:
    """Names of the manifest's shards that are not files in `folder`; none for a remote folder, whose
    shards are each read (and a missing one reported) when a data stream reaches it."""
    if is_remote(folder):
        return []
    return [s.name for s in manifest.shards if not (Path(folder) / s.name).is_file()]
