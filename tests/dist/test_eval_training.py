"""Evals during training leave the training curve as it was, and a resumed run evaluates the same
batches: its eval after the resume equals the uninterrupted run's.

Under pp2, where the eval swaps the pipeline's loss function and activation shapes and runs
DeepSpeed's inference schedule between training steps (launcher/eval/loss.py): the layout where an
eval could most easily leave state behind for the next step. (dp2 ZeRO-3, which gathers
partitioned weights for forward passes without a backward, also gave the bitwise curve; it was
left out to keep the suite's time.)
"""

from __future__ import annotations

import json
from pathlib import Path

from harness import run_ranks

STEPS = 4


def _train(data: str, out: str, overrides: tuple[str, ...], resume: str | None = None) -> dict:
    from ithaca.launcher.config.load import load_config
    from ithaca.launcher.train.loop import run_training

    cfg = load_config("debug-cpu", [
        f"data.path={data}", "data.seq_len=64", f"train.output_dir={out}", f"train.steps={STEPS}",
        "train.global_batch=4", "train.micro_batch=1", "train.log_every=100", "checkpoint.every=2",
        "data.workers=1", "parallel.sp=1", "parallel.tp=1", f"eval.path={data}", "eval.seq_len=128", *overrides])
    records = run_training(cfg, resume=resume)
    history = Path(out) / "eval" / "history.jsonl"
    evals = [json.loads(line) for line in history.read_text().splitlines()] if history.exists() else []
    return {"loss": [r.loss for r in records], "grad_norm": [r.grad_norm for r in records], "evals": evals}


def test_evals_leave_the_curve_and_resume_keeps_the_eval_batches(short_doc_shards, tmp_path):
    data, layout = str(short_doc_shards), ("parallel.dp=1", "parallel.pp=2")
    plain, _ = run_ranks(_train, 2, data, str(tmp_path / "plain"), layout)
    evaluated, _ = run_ranks(_train, 2, data, str(tmp_path / "eval"), (*layout, "eval.every=1"))
    # bitwise: the eval adds no operation to any training step
    assert evaluated["loss"] == plain["loss"] and evaluated["grad_norm"] == plain["grad_norm"]
    assert [e["step"] for e in evaluated["evals"]] == [1, 2, 3, 4] and not plain["evals"]
    losses = [e["eval_loss"] for e in evaluated["evals"]]
    assert losses[-1] < losses[0]  # the model learns, so an eval that reads the live weights sees it
    assert (tmp_path / "eval" / "eval" / "loss_by_position.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    resumed_out = tmp_path / "resumed"
    (resumed_out / "checkpoints").mkdir(parents=True)
    (tmp_path / "eval" / "checkpoints" / "step_00000002").rename(resumed_out / "checkpoints" / "step_00000002")
    resumed, _ = run_ranks(_train, 2, data, str(resumed_out), (*layout, "eval.every=1"),
                           str(resumed_out / "checkpoints" / "step_00000002"))
    assert resumed["loss"] == evaluated["loss"][2:]
    assert resumed["evals"] == evaluated["evals"][2:]
