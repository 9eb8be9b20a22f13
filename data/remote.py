"""Shard folders that are not local: `http://` and `https://` URLs, and `pipe:COMMAND` (webdataset's
forms). The manifest is read from the same place as the shards.

- `http(s)://HOST/DIR`: file NAME is HOST/DIR/NAME.
- `pipe:COMMAND`: file NAME is what COMMAND writes to stdout with `{shard}` replaced by NAME, e.g.
  `pipe:aws s3 cp s3://bucket/shards/{shard} -` for an object store.

A failed read (connection refused or dropped mid-file, fewer bytes than Content-Length, a command
that exits non-zero) is tried again, at most READ_ATTEMPTS times with a growing pause, each retry
logged. A file is always read whole, so a retried shard is the same bytes and a data stream's
position (data/stream.py's Cursor, counted in documents) is not moved by a retry.
"""

from __future__ import annotations

import http.client
import re
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from ithaca.log import get_logger

log = get_logger(__name__, all_ranks=True)  # each rank reads its own shards

READ_ATTEMPTS = 4
FIRST_PAUSE_S = 0.5
TIMEOUT_S = 60.0
SCHEMES = ("http://", "https://", "pipe:")


class NotFound(FileNotFoundError):
    """The server or command says the file does not exist (HTTP 404): not retried."""


def location_text(location: str | Path) -> str:
    """The location as the user wrote it. A `Path` made from a URL has lost the second slash of
    `scheme://` (Path collapses `//`); it is put back."""
    if isinstance(location, Path):
        return re.sub(r"\b([a-z][a-z0-9+.-]*):/(?!/)", r"\1://", str(location))
    return location


def is_remote(location: str | Path) -> bool:
    return location_text(location).startswith(SCHEMES)


def shard_folder(location: str | Path) -> str | Path:
    """A shard folder as the readers take it: a remote one as its text (a `Path` would fold a URL's
    `//`), a local one as a `Path`."""
    return location_text(location) if is_remote(location) else Path(location)


def file_address(location: str | Path, name: str) -> str:
    """Where file `name` of a remote shard folder is read from: its URL, or `pipe:` and the command."""
    text = location_text(location)
    if text.startswith("pipe:"):
        return text.replace("{shard}", name)
    return f"{text.rstrip('/')}/{name}"


def read_remote(location: str | Path, name: str) -> bytes:
    """File `name` of a remote shard folder, whole; raises NotFound, or OSError naming the address
    and the last failure once READ_ATTEMPTS reads have failed."""
    address = file_address(location, name)
    for attempt in range(1, READ_ATTEMPTS + 1):
        try:
            return _read_once(address)
        except NotFound:
            raise
        except (OSError, http.client.HTTPException, subprocess.SubprocessError) as err:
            if attempt == READ_ATTEMPTS:
                raise OSError(f"{address}: {READ_ATTEMPTS} reads failed, the last with {err}") from None
            pause = FIRST_PAUSE_S * 2 ** (attempt - 1)
            log.warning(f"data: reading {address} failed ({err}); read {attempt + 1} of {READ_ATTEMPTS} "
                        f"in {pause:.1f} s")
            time.sleep(pause)
    raise AssertionError("unreachable: the last attempt returns or raises")


def _read_once(address: str) -> bytes:
    if address.startswith("pipe:"):
        done = subprocess.run(address[len("pipe:"):], shell=True, capture_output=True, timeout=TIMEOUT_S)
        if done.returncode != 0:
            raise OSError(f"the command exited with {done.returncode}: {done.stderr.decode(errors='replace').strip()[-300:]}")
        return done.stdout
    try:
        with urllib.request.urlopen(address, timeout=TIMEOUT_S) as response:
            expected = response.headers.get("Content-Length")
            body = response.read()  # raises IncompleteRead when the connection drops before Content-Length
    except urllib.error.HTTPError as err:
        if err.code == 404:
            raise NotFound(f"{address}: HTTP 404") from None
        raise
    if expected is not None and len(body) != int(expected):
        raise OSError(f"{len(body)} of {expected} bytes arrived")
    return body
