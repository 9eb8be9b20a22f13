"""Shared test setup: the CLI runner and one session-wide folder of debug shards."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# `python -m pytest` started in the checkout puts its root first on sys.path, where its kernels/,
# data/ and models/ would shadow installed packages of those names (`make test` runs with
# PYTHONSAFEPATH=1, so there is nothing to drop; this keeps a bare `python -m pytest` right too).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]

import pytest  # noqa: E402  (after the sys.path repair above)
import torch  # noqa: E402

os.environ.setdefault("DS_ACCELERATOR", "cpu")
# Every Python the tests start (`python -m ithaca`, benchmarks, torchrun's ranks) keeps the checkout root
# off sys.path, where its kernels/, data/ and models/ would shadow installed packages of those names.
os.environ["PYTHONSAFEPATH"] = "1"
# Kernel outputs start as NaN (kernels/_alloc.py), so an element a kernel never writes fails a test.
os.environ.setdefault("ITHACA_POISON", "1")
# Without a GPU our Triton kernels run in Triton's interpreter; with one they run compiled. Set
# before anything imports triton (its jit decorator reads it).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


_WARNING = re.compile(r"Warning\b|warnings\.warn\(|^\[W\d{3,4} ")


def failure_text(output: str, limit: int = 4000) -> str:
    """What a failed subprocess said about its failure: its output without warnings (a warning line
    and the source line Python echoes under it), from the first traceback on where there is one, so
    an assertion message shows the error and not the tail of the library notices printed after it."""
    lines, skip_echo = [], False
    for line in output.splitlines():
        if skip_echo and line.startswith((" ", "\t")):
            continue
        skip_echo = bool(_WARNING.search(line))
        if not skip_echo:
            lines.append(line)
    text = "\n".join(lines)
    start = text.find("Traceback (most recent call last)")
    text = text[start:] if start >= 0 else text
    return text if len(text) <= limit else f"{text[:limit // 2]}\n[...]\n{text[-limit // 2:]}"


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
