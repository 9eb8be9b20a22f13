"""The data-pipeline benchmark runs end to end at toy size and prints every row (no timing asserted)."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT, failure_text


def test_prints_prep_training_and_loader_rows(tmp_path):
    for i in range(4):
        (tmp_path / f"{i}.txt").write_text(f"text file {i} " * 20_000)
    done = subprocess.run([sys.executable, "-m", "ithaca.bench.data_pipeline", "--device", "cpu", "--input", str(tmp_path),
                           "--steps", "2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, failure_text(done.stderr)
    rows = [line.split("|")[1].strip() for line in done.stdout.splitlines() if line.startswith("| ")][1:]
    assert rows == ["prep", "prep", "training", "loader", "loader"], done.stdout
