"""`ithaca submit --dry-run`: the batch script for several option sets (golden files), and bad input."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from ithaca.launcher.cli.main import main

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
OUT = "/nonexistent/ithaca-golden/run"  # never written: a dry run writes nothing

CASES = {  # golden file: submit options
    "cpu-1-node": ["--nodes", "1", "--gpus-per-node", "0"],
    "cpu-2-nodes": ["--nodes", "2", "--gpus-per-node", "0", "--partition", "debug", "--time", "00:30:00"],
    "gpu-2-nodes-all-options": ["--nodes", "2", "--gpus-per-node", "4", "--partition", "gpu", "--account", "lab",
                                "--time", "2-00:00:00", "--qos", "high", "--signal-grace", "300", "--max-restarts", "2",
                                "--set", "parallel.dp=4", "--set", "parallel.sp=2"],
    "cpu-2-nodes-elastic": ["--nodes", "2", "--gpus-per-node", "0", "--min-nodes", "1", "--max-restarts", "2",
                            "--set", "parallel.dp=2", "--set", "parallel.sp=2"],
}


def dry_run(capsys, debug_shards, options: list[str]) -> tuple[int, str, str]:
    code = main(["submit", "--config", "debug-cpu", "--set", f"data.path={debug_shards}",
                 "--set", f"train.output_dir={OUT}", *options, "--dry-run"])
    out, err = capsys.readouterr()
    return code, out, err


def normalized(script: str) -> str:
    """Machine-specific parts (checkout, interpreter, config hash) as placeholders."""
    script = script.replace(sys.executable, "<PYTHON>").replace(str(ROOT), "<CHECKOUT>")
    return re.sub(r"config-[0-9a-f]{10}\.yaml", "config-<HASH>.yaml", script)


@pytest.mark.parametrize("case", list(CASES))
def test_dry_run_prints_the_golden_script(capsys, debug_shards, monkeypatch, case):
    monkeypatch.chdir(ROOT)
    code, out, _ = dry_run(capsys, debug_shards, CASES[case])
    assert code == 0
    assert normalized(out) == (GOLDEN / f"submit-{case}.sbatch").read_text()
    assert not Path(OUT).exists()


@pytest.mark.parametrize("options, message", [
    (["--nodes", "0", "--gpus-per-node", "0"], "--nodes=0: use 1 or more nodes"),
    (["--nodes", "3", "--gpus-per-node", "0"], "--nodes=3: must divide dp*tp*pp*sp=2"),
    (["--nodes", "1", "--gpus-per-node", "4"], "--nodes=1: x --gpus-per-node=4 gives 4 GPUs but dp*tp*pp*sp=2"),
    (["--nodes", "1", "--gpus-per-node", "-1"], "--gpus-per-node=-1: use 0 (CPU processes) or more"),
    (["--nodes", "1", "--gpus-per-node", "0", "--max-restarts", "-1"], "--max-restarts=-1: use 0 (no restarts) or more"),
    (["--nodes", "2", "--gpus-per-node", "0", "--min-nodes", "3", "--max-restarts", "1"], "--min-nodes=3: use 1 to --nodes=2"),
    (["--nodes", "2", "--gpus-per-node", "0", "--min-nodes", "0", "--max-restarts", "1"], "--min-nodes=0: use 1 to --nodes=2"),
    (["--nodes", "2", "--gpus-per-node", "0", "--min-nodes", "1"], "--max-restarts=0: use 1 or more with --min-nodes"),
    (["--nodes", "2", "--gpus-per-node", "0", "--min-nodes", "1", "--max-restarts", "1", "--set", "parallel.dp=1",
      "--set", "parallel.sp=2"], "--min-nodes=1: 1 node(s) x 1 processes cannot hold tp x pp x sp = 2 ranks"),
])
def test_bad_options_exit_2_and_submit_nothing(capsys, debug_shards, options, message):
    code, out, err = dry_run(capsys, debug_shards, options)
    assert code == 2 and message in err and out == ""


def test_a_missing_config(capsys, tmp_path):
    assert main(["submit", "--config", str(tmp_path / "nope.yaml"), "--nodes", "1", "--gpus-per-node", "0"]) == 2
    assert "nope.yaml" in capsys.readouterr().err


def test_without_sbatch_nothing_is_written(capsys, debug_shards, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    out = tmp_path / "run"
    code = main(["submit", "--config", "debug-cpu", "--set", f"data.path={debug_shards}",
                 "--set", f"train.output_dir={out}", "--nodes", "1", "--gpus-per-node", "0"])
    assert code == 1 and "sbatch not found" in capsys.readouterr().err and not out.exists()
