"""The checkout root is never a top-level import path in a Python we start from it.

The repository root is the `ithaca` package, so its folders `kernels/`, `data/` and `models/` would
shadow installed packages of those names (transformers imports Hugging Face's `kernels`) whenever
the root is on sys.path, as `python -m` puts the working directory. Stand-in packages of those names
in a site folder on PYTHONPATH must be what every way of starting Python here imports: `python -m
ithaca` (as the tests and users run it, with and without PYTHONSAFEPATH), the ranks torchrun starts
for `ithaca train`, a benchmark and its spawned ranks, pytest itself and the harness's ranks.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, failure_text, run_cli
from harness import run_ranks

SHADOWED = ("kernels", "data", "models")
# Run at interpreter exit (sys.path[0] is only added after site runs): which file each name resolves to.
PROBE = f"""
import atexit, importlib.util, json, os

def _record():
    found = {{name: importlib.util.find_spec(name).origin for name in {SHADOWED!r}}}
    with open(os.path.join(os.environ["ITHACA_IMPORT_PROBE"], f"{{os.getpid()}}.json"), "w") as f:
        json.dump(found, f)

atexit.register(_record)
"""


@pytest.fixture
def stand_ins(tmp_path) -> tuple[dict[str, str], Path]:
    """(environment putting stand-ins and the probe first, the folder the probes write to)."""
    site, records = tmp_path / "site", tmp_path / "records"
    for name in SHADOWED:
        (site / name).mkdir(parents=True)
        (site / name / "__init__.py").write_text("STAND_IN = True\n")
    (site / "sitecustomize.py").write_text(PROBE)
    records.mkdir()
    return {"PYTHONPATH": str(site), "ITHACA_IMPORT_PROBE": str(records)}, records


def _assert_stand_ins_everywhere(records: Path, at_least: int) -> None:
    found = [json.loads(p.read_text()) for p in sorted(records.glob("*.json"))]
    assert len(found) >= at_least, f"{len(found)} processes recorded, expected {at_least} or more"
    for origins in found:
        for name, origin in origins.items():
            assert Path(origin).is_relative_to(records.parent / "site"), f"{name} came from {origin}"


def test_python_m_ithaca_with_and_without_safe_path(stand_ins):
    env, records = stand_ins
    assert run_cli("--help", cwd=ROOT, env=env).returncode == 0
    unsafe = {k: v for k, v in {**os.environ, **env}.items() if k != "PYTHONSAFEPATH"}
    done = subprocess.run([sys.executable, "-m", "ithaca", "--help"], cwd=ROOT, env=unsafe, capture_output=True, text=True)
    assert done.returncode == 0, failure_text(done.stderr)
    _assert_stand_ins_everywhere(records, at_least=2)


def test_torchrun_ranks_of_ithaca_train(stand_ins, debug_shards, tmp_path):
    env, records = stand_ins
    # started as a user's shell would: bin/ithaca, no PYTHONSAFEPATH of ours in its environment
    user_env = {k: v for k, v in {**os.environ, **env}.items() if k != "PYTHONSAFEPATH"}
    done = subprocess.run([str(Path(sys.executable).parent / "ithaca"), "train", "--config", "debug-cpu",
                           "--nproc", "2", "--set", f"data.path={debug_shards}", "--set", f"train.output_dir={tmp_path / 'run'}",
                           "--set", "train.steps=1", "--set", "data.seq_len=64", "--set", "train.global_batch=4"],
                          cwd=ROOT, env=user_env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, failure_text(done.stderr)
    _assert_stand_ins_everywhere(records, at_least=4)  # ithaca train, torchrun, two ranks


def test_a_benchmark_and_its_spawned_ranks(stand_ins):
    env, records = stand_ins
    done = subprocess.run([sys.executable, "-m", "ithaca.bench.sp_attention", "--device", "cpu", "--world", "2",
                           "--lengths", "64", "--repeats", "1"], cwd=ROOT, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, failure_text(done.stderr)
    _assert_stand_ins_everywhere(records, at_least=3)  # the benchmark and its two ranks


def _origin_of_kernels() -> str | None:
    spec = importlib.util.find_spec("kernels")
    return spec and spec.origin


def test_pytest_and_the_harness_ranks_never_see_the_root():
    assert all(Path(p or ".").resolve() != ROOT for p in sys.path)
    for origin in [_origin_of_kernels(), *run_ranks(_origin_of_kernels, 2)]:
        assert origin is None or not Path(origin).is_relative_to(ROOT / "kernels"), origin
