"""`ithaca train` with evals, then `ithaca eval` of its checkpoint under another layout, and of
its Hugging Face export.

Training (dp2) evaluates at steps 2 and 4: the eval line, eval/history.jsonl and the PNG, with
passkey retrieval (its metrics and heatmap); `ithaca eval` reshards the step-4 checkpoint to sp2
ring and gets the training run's step-4 eval loss and passkey table (the same batches and prompts,
the same weights; fp32 reduction order only). The checkpoint exported as a
Hugging Face Llama gives that loss too, evaluated by us (`model.init_from`, one rank) and by
transformers' LlamaForCausalLM on the same windows, one document at a time.
"""

from __future__ import annotations

import json
import re

import pytest

from conftest import failure_text, run_cli
from harness import run_ranks

PNG = b"\x89PNG\r\n\x1a\n"


def test_train_with_evals_then_eval_the_checkpoint_under_another_layout(short_doc_shards, tmp_path):
    data = str(short_doc_shards)
    out = tmp_path / "run"
    train = run_cli("train", "--config", "debug-cpu", "--set", f"data.path={data}", "--set", "data.seq_len=64",
                    "--set", "train.steps=4", "--set", "train.global_batch=4", "--set", f"train.output_dir={out}",
                    "--set", "eval.every=2", "--set", f"eval.path={data}", "--set", "eval.seq_len=256",
                    "--set", "eval.batches=1", "--set", "eval.metrics=[loss,positions,passkey]",
                    "--set", "eval.passkey_samples=1")
    assert train.returncode == 0, failure_text(train.stderr + train.stdout)
    lines = re.findall(r"eval step=(\d+) eval_loss=([\d.]+) eval_ppl=[\d.]+ eval_s=[\d.]+", train.stderr + train.stdout)
    assert [step for step, _ in lines] == ["2", "4"]
    history = [json.loads(line) for line in (out / "eval" / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [2, 4] and history[1]["eval_loss"] < history[0]["eval_loss"]
    assert (out / "eval" / "loss_by_position.png").read_bytes()[:8] == PNG
    journal = "".join(p.read_text() for p in (out / "tracking").glob("*.jsonl"))
    assert '"eval_loss_pos_128_255"' in journal and '"eval_ppl"' in journal  # MLflow gets them
    assert '"passkey_acc_256_50"' in journal and '"passkey_ll_128_0"' in journal
    assert (out / "eval" / "passkey.png").read_bytes()[:8] == PNG

    report = tmp_path / "eval"
    done = run_cli("eval", "--checkpoint", str(out / "checkpoints"), "--output", str(report),
                   "--set", "parallel.dp=1", "--set", "parallel.sp=2", "--set", "parallel.sp_method=ring")
    assert done.returncode == 0, failure_text(done.stderr + done.stdout)
    assert re.search(r"^eval step=4 eval_loss=[\d.]+ ", done.stdout, re.M) and "128-255" in done.stdout
    record = json.loads((report / "eval.json").read_text())
    assert record["step"] == 4 and record["tokens"] == 4 * 256
    # the same windows and weights: dp2 x ZeRO-1 against sp2 ring differ in fp32 reduction order only
    assert record["eval_loss"] == pytest.approx(history[1]["eval_loss"], rel=1e-5)
    assert [b["first"] for b in record["loss_by_position"]] == [0, 128]
    assert (report / "loss_by_position.png").read_bytes()[:8] == PNG
    # passkey: the same prompts and weights under sp2 ring give training's (dp2) step-4 table
    assert re.search(r"^passkey step=4 passkey_acc=[\d.]+ ", done.stdout, re.M)
    assert (report / "passkey.png").read_bytes()[:8] == PNG
    trained, got = history[1]["passkey"], record["passkey"]
    assert got["lengths"] == [128, 256] and len(got["cells"]) == 10
    assert [c["accuracy"] for c in got["cells"]] == [c["accuracy"] for c in trained["cells"]]
    assert [c["log_likelihood"] for c in got["cells"]] == pytest.approx(
        [c["log_likelihood"] for c in trained["cells"]], rel=1e-5)

    hf = tmp_path / "hf"
    from ithaca.launcher.checkpoint.export import export_checkpoint

    assert export_checkpoint(out / "checkpoints", hf) == "huggingface"
    (ours,) = run_ranks(_eval_hf, 1, data, str(hf), str(tmp_path / "hf-eval"))
    assert ours == pytest.approx(record["eval_loss"], rel=1e-5)
    assert _transformers_loss(hf, short_doc_shards) == pytest.approx(record["eval_loss"], rel=1e-5)


EVAL = ("eval.seq_len=256", "eval.batches=1", "train.global_batch=4")


def _eval_hf(data: str, hf: str, out: str) -> float:
    from pathlib import Path

    from ithaca.launcher.config.load import load_config
    from ithaca.launcher.eval.saved import evaluate_saved

    cfg = load_config("debug-cpu", [f"data.path={data}", f"eval.path={data}", f"model.init_from={hf}",
                                    "parallel.dp=1", *EVAL])
    _, totals, _, _ = evaluate_saved(cfg, checkpoint=None, source=hf, output=Path(out))
    return totals.loss


def _transformers_loss(hf, data) -> float:
    import torch

    from ithaca.data.batch import Batch
    from ithaca.data.shards import read_manifest
    from ithaca.launcher.eval.batches import eval_windows

    transformers = pytest.importorskip("transformers")  # the test extra
    model = transformers.LlamaForCausalLM.from_pretrained(hf, torch_dtype=torch.float32)
    manifest = read_manifest(data)
    batch = Batch.from_window(eval_windows(data, manifest, 256, 4), manifest.tokenizer["eos_id"])
    total, count = 0.0, 0
    with torch.no_grad():
        for row in range(batch.tokens.shape[0]):
            for doc in batch.doc_ids[row].unique():  # each packed document alone: positions from 0, no other document
                keep = batch.doc_ids[row] == doc
                logits = model(batch.tokens[row][keep][None]).logits[0]
                total += torch.nn.functional.cross_entropy(logits, batch.labels[row][keep], reduction="sum").item()
                count += int(keep.sum())
    return total / count
