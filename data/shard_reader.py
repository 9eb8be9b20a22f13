"""Reads one shard back: its bytes checked against the manifest's sha256, its documents decoded.

A shard is read whole (a few MB) so that a corrupt, truncated or missing file is found before any
of its documents reach training, and so that its documents can be visited in a shuffled order.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
from webdataset.tariterators import group_by_keys, tar_file_iterator

from ithaca.data.remote import file_address, is_remote, read_remote
from ithaca.data.shards import ShardInfo


class ShardError(ValueError):
    """A shard that cannot be used; the message names the file and what is wrong with it."""


def _error(path: Path | str, problem: str) -> ShardError:
    return ShardError(f"shard {path}: {problem}")


def read_shard(folder: Path | str, info: ShardInfo) -> list[np.ndarray]:
    """The shard's documents (token ids) in stored order; raises ShardError if it is not the manifest's.
    `folder` may be remote (data/remote.py): a read that fails after its retries is a ShardError too."""
    remote = is_remote(folder)
    path = file_address(folder, info.name) if remote else Path(folder) / info.name
    try:
        raw = read_remote(folder, info.name) if remote else path.read_bytes()
    except FileNotFoundError:  # remote.NotFound too
        raise _error(path, "missing; restore it or re-run `ithaca prep`, or set data.on_error: skip") from None
    except OSError as err:
        if not remote:
            raise
        raise _error(path, f"could not be read ({err}); check the server, or set data.on_error: skip") from None
    if hashlib.sha256(raw).hexdigest() != info.sha256:
        raise _error(path, f"corrupt or truncated ({len(raw)} bytes; sha256 differs from the manifest's); "
                           "restore it or re-run `ithaca prep`, or set data.on_error: skip")
    try:
        files = ({**f, "__url__": str(path)} for f in tar_file_iterator(io.BytesIO(raw)))
        samples = group_by_keys(files)
        docs = [np.load(io.BytesIO(s["tokens.npy"]), allow_pickle=False) for s in samples]
    except Exception as err:  # tarfile and numpy raise many types; the file matched its hash, so prep wrote it wrong
        raise _error(path, f"unreadable although its sha256 matches ({err!r}); re-run `ithaca prep`") from None
    if len(docs) != info.documents or sum(d.size for d in docs) != info.tokens:
        raise _error(path, f"holds {len(docs)} documents, the manifest says {info.documents}; re-run `ithaca prep`")
    return docs
