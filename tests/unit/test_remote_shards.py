"""Shard folders read over HTTP and through `pipe:` (data/remote.py) give the local folder's batches;
a connection dropped mid-shard is retried (logged) without moving the stream; a shard that fails
its sha256 is handled as a local one; a folder with no manifest there is refused naming it."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from ithaca.data import PackedLoader, ShardError, Source, read_manifest
from shard_server import ShardServer
from test_loader import make_loader, numbered_texts, write_documents

STEPS = 6


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_documents(tmp_path_factory.mktemp("remote"), numbered_texts(120), shard_tokens=600)


@pytest.fixture
def server(shards):
    server = ShardServer(shards, 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def steps(loader: PackedLoader, n: int) -> list[np.ndarray]:
    return [w.numpy() for _ in range(n) for w in loader.next_step()]


def test_http_and_pipe_read_the_local_batches_and_a_dropped_connection_is_retried(shards, server, caplog):
    names = [s.name for s in read_manifest(shards).shards]
    server.to_drop.update(names[:3])  # each stream's first shard loses its connection half-way once
    local = make_loader(shards, dp=1, workers=0)
    # loop.py hands the loader Path(data.path), which folds "http://" to "http:/"
    remote = [make_loader([Source(Path(server.url()))], dp=1, workers=0),
              make_loader([Source(f"pipe:cat {shards}/{{shard}}")], dp=1, workers=0)]
    expected = steps(local, STEPS)
    for loader in remote:
        np.testing.assert_array_equal(np.stack(steps(loader, STEPS)), np.stack(expected))
        assert loader.state_dict() == local.state_dict()
    dropped = [n for n in names[:3] if n in server.requests]
    assert dropped and all(server.requests.count(n) == 2 for n in dropped), server.requests
    assert f"reading {server.url()}/{dropped[0]} failed" in caplog.text
    # and the position a checkpoint keeps continues exactly over HTTP
    resumed = make_loader([Source(server.url())], dp=1, workers=0, state=[remote[0].state_dict()])
    np.testing.assert_array_equal(np.stack(steps(resumed, 2)), np.stack(steps(local, 2)))


def test_a_downloaded_shard_failing_its_sha256_stops_the_run_or_is_skipped_and_counted(shards, server):
    steps(make_loader([Source(server.url())], dp=1, workers=0), 1)
    first = server.requests[1]  # the stream's first shard (after manifest.json)
    server.corrupt.add(first)
    with pytest.raises(ShardError, match=f"shard {server.url()}/{first}: corrupt or truncated"):
        steps(make_loader([Source(server.url())], dp=1, workers=0), STEPS)
    skipping = make_loader([Source(server.url())], dp=1, workers=0, on_error="skip")
    steps(skipping, STEPS)
    assert skipping.skipped_shards == 1


def test_a_remote_folder_without_a_manifest_is_refused_naming_it(server):
    with pytest.raises(ValueError, match=f"data.path='{server.url()}/nothing': cannot read manifest.json .*404"):
        read_manifest(f"{server.url()}/nothing")
