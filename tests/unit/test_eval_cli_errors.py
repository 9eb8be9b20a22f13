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
          "eval.passkey=true", "--set", "eval.seq_len=64"), 2, "eval.passkey=True: eval.seq_len=64 is shorter than"),
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
