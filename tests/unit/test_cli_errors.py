"""Bad input at the command line: a clear one-line error, a non-zero exit, and nothing written."""

from __future__ import annotations

import pytest
import torch

from ithaca.launcher.cli.main import main


def train(capsys, tmp_path, *extra: str) -> tuple[int, str]:
    out = tmp_path / "run"
    code = main(["train", "--config", "debug-cpu", "--set", f"train.output_dir={out}", *extra])
    err = capsys.readouterr().err
    assert not out.exists(), "a refused run must write nothing"
    return code, err


@pytest.mark.parametrize("extra, message", [
    (["--set", "train.stpes=3"], "train.stpes=3: unknown key; did you mean 'steps'?"),
    (["--set", "eval.passkey=true"], "eval.passkey=True: replaced by eval.metrics: list passkey there"),
    (["--set", "tracking.uri=file:/tmp/mlruns"], "tracking.uri='file:/tmp/mlruns': MLflow 3 no longer takes a file store"),
    (["--nproc", "3"], "dp*tp*pp*sp=2 must equal the world size 3"),
    (["--set", "parallel.tp=3"], "n_heads=4 must be divisible by tp*ulysses=3"),
    (["--set", "parallel.sp=2", "--set", "parallel.dp=1", "--set", "data.seq_len=127"],
     "data.seq_len=127: must be divisible by 2 (sp=2, sp_method=ulysses)"),
    (["--set", "model.n_heads=6", "--set", "model.n_kv_heads=3", "--set", "model.dim=96",
      "--set", "parallel.sp=2", "--set", "parallel.dp=1"], "Ulysses splits n_kv_heads/tp=3 kv heads over 2 ranks"),
    (["--max-restarts", "-1"], "--max-restarts=-1: use 0 (no restarts) or more"),
    (["--set", "train.step_timeout=0"], "train.step_timeout=0.0: use a number of seconds > 0"),
    (["--set", "model.linear_sp_exchange=ring"], "model.linear_sp_exchange"),
])
def test_config_errors_exit_2_with_one_line(capsys, tmp_path, debug_shards, extra, message):
    code, err = train(capsys, tmp_path, "--set", f"data.path={debug_shards}", *extra)
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine can run Triton kernels")
def test_triton_kernels_without_a_gpu(capsys, tmp_path, debug_shards, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    code, err = train(capsys, tmp_path, "--set", f"data.path={debug_shards}", "--set", "model.kernels=triton")
    assert code == 2 and "model.kernels='triton': our Triton kernels run on CUDA GPUs" in err
    assert err.count("\n") == 1


def test_missing_config_file(capsys, tmp_path):
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err


def test_missing_and_empty_shard_folders(capsys, tmp_path):
    code, err = train(capsys, tmp_path, "--set", f"data.path={tmp_path / 'nowhere'}")
    assert code == 2 and "data.path=" in err and "no such folder" in err and "ithaca prep" in err
    (tmp_path / "empty").mkdir()
    code, err = train(capsys, tmp_path, "--set", f"data.path={tmp_path / 'empty'}")
    assert code == 2 and "no manifest.json" in err


def test_vocab_smaller_than_the_shards_tokenizer(capsys, tmp_path, debug_shards):
    code, err = train(capsys, tmp_path, "--set", f"data.path={debug_shards}", "--set", "model.vocab_size=256")
    assert code == 2 and "model.vocab_size=256: the shards' tokenizer has 257 ids" in err


def test_resume_without_a_checkpoint(capsys, tmp_path, debug_shards):
    code, err = train(capsys, tmp_path, "--set", f"data.path={debug_shards}", "--resume")
    assert code == 1 and "--resume: no checkpoint in" in err


def test_prep_refuses_empty_input_and_writes_nothing(capsys, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    out = tmp_path / "shards"
    assert main(["prep", "--input", str(tmp_path / "empty.txt"), "--output", str(out)]) == 1
    assert "hold no text" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".shards*"))


def test_prep_refuses_a_non_empty_output_and_a_missing_input(capsys, tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("mine")
    assert main(["prep", "--input", str(tmp_path / "a.txt"), "--output", str(tmp_path / "out")]) == 1
    assert "not empty" in capsys.readouterr().err and (tmp_path / "out" / "keep").read_text() == "mine"
    assert main(["prep", "--input", str(tmp_path / "nope"), "--output", str(tmp_path / "o2")]) == 1
    assert "no such file or folder" in capsys.readouterr().err


@pytest.fixture
def small_shards(tmp_path):
    from ithaca.data import ByteTokenizer, prep

    (tmp_path / "doc.txt").write_text("some text to train on\n" * 200)
    (tmp_path / "more.txt").write_text("more text\n" * 300)
    prep([tmp_path / "doc.txt", tmp_path / "more.txt"], tmp_path / "shards", ByteTokenizer(), shard_tokens=1000)
    return tmp_path / "shards"


def test_shards_of_another_tokenizer_are_refused(capsys, tmp_path, small_shards):
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1}, unk_token="<unk>")).save(str(tmp_path / "tok.json"))
    code, err = train(capsys, tmp_path, "--set", f"data.path={small_shards}", "--set", f"data.tokenizer={tmp_path / 'tok.json'}")
    assert code == 2 and "data.tokenizer=" in err and "was prepped with tokenizer {'kind': 'byte'" in err
    code, err = train(capsys, tmp_path, "--set", f"data.path={small_shards}", "--set", "data.tokenizer=byte",
                      "--set", "model.vocab_size=256")
    assert "data.tokenizer" not in err and "model.vocab_size=256" in err  # the right one passes, on to the next check


def test_a_missing_shard_is_named_before_any_process_starts(capsys, tmp_path, small_shards):
    (small_shards / "shard-000001.tar").unlink()
    code, err = train(capsys, tmp_path, "--set", f"data.path={small_shards}")
    assert code == 2 and "shard shard-000001.tar is missing" in err and "data.on_error: skip" in err


def test_more_data_streams_than_shards(capsys, tmp_path, small_shards):
    code, err = train(capsys, tmp_path, "--set", f"data.path={small_shards}", "--set", "data.workers=8")
    assert code == 2 and "data.workers=8: " in err and "fewer than the 16 data streams" in err


def test_a_mixture_and_a_path_together(capsys, tmp_path, small_shards):
    code, err = train(capsys, tmp_path, "--set", f"data.path={small_shards}",
                      "--set", f"data.mixture={{{small_shards}: 1.0}}")
    assert code == 2 and "give either data.path or data.mixture" in err


def test_resume_auto_starts_fresh_without_a_checkpoint(capsys, tmp_path, debug_shards):
    # plain --resume needs a checkpoint; auto goes on to the next check (here: the world size)
    code, err = train(capsys, tmp_path, "--set", f"data.path={debug_shards}", "--resume", "auto", "--nproc", "3")
    assert code == 2 and "no checkpoint" not in err and "must equal the world size 3" in err


def test_init_from_a_folder_without_a_model_is_named_before_any_process_starts(capsys, tmp_path, debug_shards):
    code, err = train(capsys, tmp_path, "--set", f"data.path={debug_shards}",
                      "--set", f"model.init_from={tmp_path / 'nope'}")
    assert code == 1 and "no config.json there" in err and str(tmp_path / "nope") in err
    assert err.count("\n") == 1
