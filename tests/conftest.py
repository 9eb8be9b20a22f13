"""Shared test setup: the CLI runner and one session-wide folder of debug shards."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
# Kernel outputs start as NaN (kernels/_alloc.py), so an element a kernel never writes fails a test.
os.environ.setdefault("ITHACA_POISON", "1")
# Without a GPU our Triton kernels run in Triton's interpreter; with one they run compiled. Set
# before anything imports triton (its jit decorator reads it).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m ithaca ...` as a user would; returns the finished process (output captured)."""
    return subprocess.run([sys.executable, "-m", "ithaca", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture(scope="session")
def debug_shards(tmp_path_factory) -> Path:
    """Byte-level shards of the standard library's modules, written once per session by `ithaca prep`."""
    out = tmp_path_factory.mktemp("data") / "debug-data"
    done = run_cli("prep", "--output", str(out), "--shard-tokens", "1000000")
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture(scope="session")
def short_doc_shards(tmp_path_factory) -> Path:
    """Shards of short documents (paragraphs of standard-library modules, mostly under 64 tokens
    apart), so that 10 training steps of 64-token windows cross many document boundaries."""
    import json

    from ithaca.data import ByteTokenizer, prep
    from ithaca.data.inputs import default_inputs

    root = tmp_path_factory.mktemp("short-docs")
    paragraphs = [p for f in default_inputs()[:4] for p in f.read_text().split("\n\n") if p.strip()]
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs))
    prep([root / "docs.jsonl"], root / "shards", ByteTokenizer(), shard_tokens=4_000)  # several shards: one per data stream at least
    return root / "shards"
