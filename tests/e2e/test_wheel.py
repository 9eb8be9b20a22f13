"""The installed artefact is what runs: a wheel built from this tree, installed into a fresh venv
with no source tree on sys.path, imports every module, preps shards and trains three steps from an
empty folder. (An editable install hides a package left out of the wheel: kernels/causal_conv1d was.)"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

from conftest import ROOT, failure_text

# flash_cuda needs the GPU extra (flash-attn); __main__ modules run their command when imported.
NOT_IMPORTABLE_HERE = ("ithaca.kernels.attention.flash_cuda",)
IMPORT_ALL = f"""
import importlib, pkgutil, sys
import ithaca
assert ithaca.__file__.startswith(sys.prefix), ithaca.__file__
names = [m.name for m in pkgutil.walk_packages(ithaca.__path__, "ithaca.")
         if not m.name.endswith("__main__") and m.name not in {NOT_IMPORTABLE_HERE!r}]
for name in names:
    importlib.import_module(name)
print(len(names))
"""


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(cmd)}:\n{failure_text(done.stdout + done.stderr)}"
    return done


def _source_tree(to: Path) -> Path:
    """This checkout's files as git sees them (tracked, and new files not ignored), without build outputs."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.splitlines()
    for name in listed:
        if (ROOT / name).is_file():
            (to / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, to / name)
    return to


def test_a_wheel_installed_in_a_fresh_venv_imports_preps_and_trains(tmp_path):
    src = _source_tree(tmp_path / "src")
    modules = {"ithaca/" + str(p.relative_to(src)) for p in src.rglob("*.py") if p.parts[len(src.parts)] != "tests"}
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"),
          str(src)], cwd=tmp_path, env=dict(os.environ))
    (wheel,) = (tmp_path / "dist").glob("ithaca-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    assert modules - shipped == set(), f"modules missing from the wheel: {sorted(modules - shipped)}"
    assert {"ithaca/configs/debug-cpu.yaml", "ithaca/slurm/job.sbatch"} <= shipped

    # A fresh venv. Its dependencies are the tested ones of this interpreter's site-packages, added as a
    # plain path entry: .pth files there (the editable install's finder among them) are not run.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "tested_dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    # as a user's shell has it: none of the tests' own settings (interpreted Triton, poisoned outputs)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "TRITON_INTERPRET", "ITHACA_POISON")}
    _run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], cwd=tmp_path, env=env)

    empty = tmp_path / "empty"
    empty.mkdir()
    assert int(_run([str(python), "-c", IMPORT_ALL], cwd=empty, env=env).stdout) > 100
    ithaca = str(venv / "bin" / "ithaca")
    _run([ithaca, "prep", "--output", "shards", "--shard-tokens", "1000000"], cwd=empty, env=env)
    done = _run([ithaca, "train", "--config", "debug-cpu", "--set", "data.path=shards", "--set", "train.steps=3",
                 "--set", "train.log_every=1", "--set", "data.seq_len=64", "--set", "train.global_batch=4"],
                cwd=empty, env=env)
    assert "step=3 " in done.stderr + done.stdout, failure_text(done.stderr)
    assert (empty / "runs" / "debug-cpu" / "checkpoints" / "latest").read_text() == "step_00000003"
