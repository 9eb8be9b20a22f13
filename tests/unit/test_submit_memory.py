"""`ithaca submit` refuses, in one line and before anything is written, a job whose predicted peak per
rank exceeds what a rank of the job's node shape has; --force submits it anyway."""

from __future__ import annotations

import pytest

from ithaca.launcher.cli.main import main

# debug-cpu under ZeRO-1 needs 1.87 GiB a rank, nearly all of it DeepSpeed's reduce bucket; ZeRO-0 needs 0.13
SHAPES = {  # device file, submit options, what a rank has
    "cpu": ("name: cpu\nmemory_gib: 1\n", ["--gpus-per-node", "0"], "0.50 GiB a cpu rank has (1 GiB RAM shared by 2 ranks)"),
    "gpu": ("name: small-gpu\nmemory_gib: 1\n", ["--gpus-per-node", "2"], "1.00 GiB a small-gpu rank has;"),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_a_job_that_will_not_fit_is_refused_and_force_submits_it(capsys, debug_shards, tmp_path, monkeypatch, shape):
    device_file, options, per_rank = SHAPES[shape]
    device = tmp_path / "device.yaml"
    device.write_text(device_file)
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch: --force gets as far as looking for it
    out = tmp_path / "run"
    submit = ["submit", "--config", "debug-cpu", "--set", f"data.path={debug_shards}", "--set",
              f"train.output_dir={out}", "--nodes", "1", *options, "--device", str(device)]

    assert main(submit) == 2
    stdout, stderr = capsys.readouterr()
    (line,) = stderr.strip().splitlines()
    assert "predicted peak 1.87 GiB per rank exceeds the " + per_rank in line
    assert "largest term comm_buffers 1.86 GiB; the fastest that fits is " in line
    assert "z0" in line.split("the fastest that fits is")[1] and line.endswith("or pass --force to run anyway")
    assert stdout == "" and not out.exists()

    assert main([*submit, "--force"]) == 1  # past the memory check, stopped only by the missing sbatch
    assert "sbatch not found" in capsys.readouterr().err and not out.exists()
