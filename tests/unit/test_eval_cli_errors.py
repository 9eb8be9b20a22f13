"""`ithaca eval`'s bad inputs: one line, exit code, and no output folder (all refused before any
process starts)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from ithaca.launcher.cli.main import main


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A folder that passes for a checkpoint up to its files (the ranks verify those)."""
    folder = tmp_path_factory.mktemp("ckpt") / "checkpoints" / "step_00000001"
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text("{}")
    return folder


def _eval(tmp_path, *args: str) -> int:
    return main(["eval", "--output", str(tmp_path / "report"), "--config", "debug-cpu", *args])


def test_bad_inputs_get_one_line_and_write_nothing(capsys, tmp_path, short_doc_shards, checkpoint):
    from ithaca.models.hf_llama import hf_config
    from ithaca.models.llama_args import LlamaArgs

    data = f"data.path={short_doc_shards}"
    cases = [  # (arguments, exit code, what the line says)
        (("--checkpoint", str(checkpoint), "--set", data), 2, "eval.path=None: data.path=.* without a holdout"),
        (("--checkpoint", str(checkpoint), "--set", data, "--set", f"eval.path={short_doc_shards}", "--set",
          "parallel.dp=1", "--set", "parallel.sp=2", "--set", "parallel.sp_method=ring", "--set", "eval.seq_len=130"),
         2, "eval.seq_len=130: must be divisible by 4"),
        (("--checkpoint", str(tmp_path), "--set", data), 1, "--checkpoint=.*: not a finished checkpoint folder"),
        (("--hf", str(tmp_path / "hf"), "--set", data, "--set", f"eval.path={short_doc_shards}"), 1,
         "hidden_size=96 but model.dim=64"),
        (("--checkpoint", str(checkpoint), "--set", data, "--set", f"eval.path={short_doc_shards}", "--set",
          "eval.batches=100000"), 1, "fewer than the"),
        (("--checkpoint", str(checkpoint), "--set", data, "--set", f"eval.path={short_doc_shards}", "--set",
          "eval.metrics=[passkey]", "--set", "eval.seq_len=64"), 2,
         "eval.metrics=.passkey.: eval.seq_len=64 is shorter than"),
        (("--hf", str(tmp_path / "hf"), "--set", data, "--mlflow"), 2, "--mlflow='run': a Hugging Face model has no "
                                                                      "training run to log into; use --mlflow new"),
        (("--checkpoint", str(checkpoint), "--set", data, "--set", f"eval.path={short_doc_shards}", "--set",
          f"train.output_dir={tmp_path / 'trained'}", "--mlflow"), 2, "--mlflow='run': no tracking journal in "),
        (("--checkpoint", str(checkpoint), "--set", data, "--set", "eval.metrics=[loss,perplexity]"), 2,
         r"eval.metrics\[1\]='perplexity': choose one of 'loss', 'positions', 'passkey'"),
    ]
    (tmp_path / "hf").mkdir()
    other = LlamaArgs(vocab_size=320, dim=96, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=192)
    (tmp_path / "hf" / "config.json").write_text(json.dumps(
        hf_config(other, max_position_embeddings=128, dtype=torch.float32, eos_token_id=None)))
    for args, code, message in cases:
        assert _eval(tmp_path, *args) == code, args
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and re.search(message, err), err
        assert not (tmp_path / "report").exists()


def test_train_checks_the_eval_data_before_any_rank_starts(capsys, tmp_path, short_doc_shards):
    data = f"data.path={short_doc_shards}"
    cases = [  # (overrides, what the one line says); each exits 2
        ((data,), "eval.path=None: data.path=.* was prepped without a holdout"),
        ((data, f"eval.path={tmp_path / 'nowhere'}"), "eval.path='.*nowhere': no such folder"),
        ((data, f"eval.path={short_doc_shards}", "parallel.dp=1", "parallel.sp=2", "parallel.sp_method=ring",
          "eval.seq_len=130"), "eval.seq_len=130: must be divisible by 4"),
        ((data, f"eval.path={short_doc_shards}", "eval.metrics=[passkey]", "eval.seq_len=64"),
         "eval.metrics='passkey': eval.seq_len=64 is shorter than"),
        ((data, "eval.metrics=[]"), r"eval.metrics=\[\]: list each of loss, positions, passkey"),
    ]
    for overrides, message in cases:
        args = [item for o in ("eval.every=2", f"train.output_dir={tmp_path / 'run'}", *overrides)
                for item in ("--set", o)]
        assert main(["train", "--config", "debug-cpu", *args]) == 2, overrides
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and re.search(message, err), err
        assert not (tmp_path / "run").exists()
