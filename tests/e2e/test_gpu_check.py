"""bench/gpu_check.sh, the one command for a GPU machine, runs end to end here in its CPU mode."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import ROOT, failure_text


def test_gpu_check_runs_every_step_and_writes_one_results_section(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n")
    done = subprocess.run(["bash", "bench/gpu_check.sh", "--device", "cpu", "--out", str(tmp_path / "out"),
                           "--results", str(results), "--pytest-args", "tests/kernels/test_swiglu.py"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 0, failure_text(done.stdout) + failure_text(done.stderr)
    section = results.read_text()
    assert section.startswith("# Benchmark results\n\n## gpu_check on CPU")  # appended, not overwritten
    headers = [line for line in section.splitlines() if line.startswith("### ")]
    assert [h.split(" (")[0] for h in headers] == [
        "### kernel-tests", "### bench-kernels", "### bench-memory", "### bench-train-throughput"]
    assert all(h.endswith("exit 0)") for h in headers), headers
    assert "| linear_cross_entropy (auto) |" in section and "| debug-hybrid-cpu | auto |" in section
    assert (tmp_path / "out" / "RESULTS-section.md").read_text() in section
