"""The sequence-parallel benchmark runs at toy size and its byte counts match its formulas (no timing asserted)."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT, failure_text


def test_bytes_sent_match_the_formulas():
    done = subprocess.run([sys.executable, "-m", "ithaca.bench.sp_attention", "--device", "cpu", "--world", "2", "4",
                           "--lengths", "64", "--repeats", "1"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, failure_text(done.stderr)
    rows = [line.split("|") for line in done.stdout.splitlines() if line.startswith("| 64 ")]
    per_world = {2: ["ulysses", "ring", "lasp2", "lasp2-scan", "delta", "delta-scan"],
                 4: ["ulysses", "ring", "usp", "lasp2", "lasp2-scan", "delta", "delta-scan"]}
    assert [r[3].strip() for r in rows] == per_world[2] + per_world[4]
    assert all(r[8].strip() == "1.000" for r in rows), done.stdout
