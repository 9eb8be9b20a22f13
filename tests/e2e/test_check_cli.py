"""`ithaca check` and `ithaca train --check-first` as a user runs them (each side under torchrun).

A layout broken on purpose (ITHACA_TEST_BREAK, launcher/runtime/faults.py: the last block's qkv gradient
scaled by sp, or only sp rank 0's share of it kept) trains and logs a plausible loss; the check
fails naming that parameter, and --check-first refuses to train. A correct layout passes and
then trains. Correct layouts one by one: tests/dist/test_check_layouts.py.
"""

from __future__ import annotations

from pathlib import Path

from conftest import failure_text, run_cli

BROKEN = "blocks.1.attn.qkv.weight"  # the parameter ITHACA_TEST_BREAK changes in the 2-layer debug model


def sp2_args(shards: Path, *extra: str) -> list[str]:
    sets = [f"data.path={shards}", "data.seq_len=64", "train.global_batch=4", "train.micro_batch=1",
            "parallel.dp=1", "parallel.sp=2", *extra]
    return ["--config", "debug-cpu", *(item for s in sets for item in ("--set", s))]


def test_check_fails_naming_the_parameter_of_a_broken_layout(short_doc_shards, tmp_path):
    done = run_cli("check", *sp2_args(short_doc_shards), "--steps", "2", cwd=tmp_path,
                   env={"ITHACA_TEST_BREAK": "sp_grad_scale"})
    assert done.returncode == 1, failure_text(done.stderr)
    verdict = done.stderr.strip().splitlines()[-1]
    assert verdict.startswith("ithaca: check failed: dp=1 tp=1 pp=1 sp=2 sp_method=ulysses zero_stage=1: step 1: "
                              f"the gradient of {BROKEN} differs"), verdict
    rows = [line.split() for line in done.stdout.splitlines() if line.split()[:1] in (["1"], ["2"])]
    assert [row[-1] for row in rows] == [BROKEN, BROKEN]  # the table's worst parameter at both steps
    assert float(rows[0][3]) < 1e-6  # ...while step 1's loss agrees: the loss curve alone shows nothing


def test_train_check_first_refuses_a_broken_layout(short_doc_shards, tmp_path):
    out = tmp_path / "run"
    done = run_cli("train", *sp2_args(short_doc_shards, "parallel.sp_method=ring", f"train.output_dir={out}",
                                      "train.steps=2"), "--check-first", cwd=tmp_path,
                   env={"ITHACA_TEST_BREAK": "sp_grad_drop"})
    assert done.returncode == 1, failure_text(done.stderr)
    assert "ithaca: check failed, not training: dp=1 tp=1 pp=1 sp=2 sp_method=ring" in done.stderr
    assert f"the gradient of {BROKEN} differs" in done.stderr
    assert not out.exists()  # no config, checkpoint or MLflow run: training never started


def test_train_check_first_passes_a_correct_layout_then_trains(short_doc_shards, tmp_path):
    out = tmp_path / "run"
    done = run_cli("train", *sp2_args(short_doc_shards, f"train.output_dir={out}", "train.steps=2"),
                   "--check-first", cwd=tmp_path)
    assert done.returncode == 0, failure_text(done.stderr)
    assert "check passed: dp=1 tp=1 pp=1 sp=2 sp_method=ulysses zero_stage=1 matches one process over 3 steps" \
        in done.stdout
    assert "step=2 loss=" in done.stderr
    assert (out / "checkpoints" / "latest").read_text() == "step_00000002"
