"""The pipeline-bubble benchmark runs at toy size through the real training step (no timing asserted)."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT, failure_text


def test_prints_one_row_per_stage_with_the_1f1b_bound():
    done = subprocess.run([sys.executable, "-m", "ithaca.bench.pipeline_bubble", "--device", "cpu", "--pp", "2",
                           "--micro-batches", "4", "--dim", "32", "--seq", "64"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, failure_text(done.stderr)
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in done.stdout.splitlines() if line.startswith("| 2 ")]
    assert [r[2] for r in rows] == ["0", "1"], done.stdout
    for _, _, _, idle, in_p2p, bound in rows:
        assert 0 <= float(in_p2p) <= float(idle) + 0.01 and float(idle) < 1  # fractions of the step
        assert bound == "0.200"  # (P-1)/(M+P-1) with P=2, M=4
