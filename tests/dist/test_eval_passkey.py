"""Passkey retrieval: the prompts (byte tokenizer and a tokenizer.json), the scoring on hand-made logits (a copying head reaches 1.0, a
head that only knows the answer is a digit falls to chance), sp2 equal to one process on the
whole table of a model at initialization and, on the same two ranks, the vocab-parallel argmax of
a hand-made head split in two (as under tp2) equal to the whole vocabulary's.
"""

from __future__ import annotations

import functools
import tempfile

import numpy as np
import pytest
import torch

from harness import run_ranks

PNG = b"\x89PNG\r\n\x1a\n"
SEQ_LEN = 256


@functools.cache
def _prompts(folder: str):
    from ithaca.data.shards import read_manifest
    from ithaca.data.tokenizer import ByteTokenizer
    from ithaca.launcher.eval.passkey_prompts import build_prompts, filler_tokens

    manifest = read_manifest(folder)
    return build_prompts(ByteTokenizer(), filler_tokens(folder, manifest, 4 * SEQ_LEN), seq_len=SEQ_LEN, samples=4)


def test_prompts_hide_the_key_at_each_depth_and_ask_for_it(short_doc_shards):
    from ithaca.launcher.eval.passkey_prompts import DEPTHS

    prompts = _prompts(str(short_doc_shards))
    assert prompts.lengths == [128, 256] and len(prompts.cells) == 2 * len(DEPTHS) * 4
    again = _prompts.__wrapped__(str(short_doc_shards))
    assert torch.equal(again.windows, prompts.windows)  # seeded: the same prompts every time
    for window, answer, (length, depth) in zip(prompts.windows, prompts.answer, prompts.cells):
        text = bytes(window[:length].tolist()).decode("utf-8", errors="replace")
        key = bytes(window[1:][answer].tolist()).decode()  # the labels kept are the answer's tokens
        assert len(key) == 5 and key.isdigit() and text.endswith(f" What is the pass key? The pass key is {key}")
        filler = length - len(f" The pass key is {key}. " + " What is the pass key? The pass key is " + key)
        at = bytes(window[:length].tolist()).index(f" The pass key is {key}. ".encode())  # bytes: filler has UTF-8
        assert at == round(filler * depth / 100), (length, depth)
        assert (window[length:] == 256).all()  # EOS after the prompt


def test_prompts_with_a_tokenizer_json_ask_for_the_keys_tokens(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from ithaca.data.tokenizer import HFTokenizer
    from ithaca.launcher.eval.passkey_prompts import build_prompts

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    text = ["the quick brown fox jumps over the lazy dog 0123456789 12 345 6789"] * 20
    bpe.train_from_iterator(text, trainers.BpeTrainer(vocab_size=320, special_tokens=["<unk>", "</s>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe.save(str(tmp_path / "tokenizer.json"))
    tokenizer = HFTokenizer(tmp_path / "tokenizer.json")
    filler = tokenizer.encode(" ".join(text))
    prompts = build_prompts(tokenizer, np.tile(filler, 20), seq_len=SEQ_LEN, samples=2)
    assert prompts.lengths == [128, 256] and prompts.eos_id == 1
    for window, answer, (length, _) in zip(prompts.windows, prompts.answer, prompts.cells):
        key = bpe.decode(window[1:][answer].tolist())
        asked = bpe.decode(window[:length].tolist())
        assert len(key) == 5 and key.isdigit() and asked.endswith(f"The pass key is {key}")
        assert f"The pass key is {key}." in asked and (window[length:] == 1).all()


def _hand_made_sums(prompts, copy: float, seed: int = 0) -> torch.Tensor:
    """Per-prompt sums from a head whose logits are the identity on a one-hot hidden state: at each
    answer position the label with probability `copy`, else a random digit."""
    from ithaca.launcher.eval.answer_logits import answer_hits

    gen = torch.Generator().manual_seed(seed)
    weight = torch.eye(257)
    labels = prompts.windows[:, 1:].masked_fill(~prompts.answer, -100)
    guess = torch.randint(ord("0"), ord("9") + 1, labels.shape, generator=gen)
    picked = torch.where(torch.rand(labels.shape, generator=gen) < copy, labels, guess).clamp(min=0)
    hidden = torch.nn.functional.one_hot(picked, 257).float()
    hits = answer_hits(hidden, weight, labels, group=None)
    tokens = prompts.answer.sum(dim=1).double()
    return torch.stack([tokens, hits, -tokens])


def test_scoring_reaches_one_for_a_copying_head_and_falls_to_chance(short_doc_shards, tmp_path):
    from ithaca.launcher.eval.passkey_table import passkey_table
    from ithaca.launcher.eval.plots import plot_passkey

    prompts = _prompts(str(short_doc_shards))
    copying = passkey_table(prompts, _hand_made_sums(prompts, copy=1.0))
    assert set(copying.accuracy.values()) == {1.0} and len(copying.accuracy) == 10
    assert set(copying.metrics()) >= {"passkey_acc_128_0", "passkey_acc_256_100", "passkey_ll_256_50"}
    guessing = _hand_made_sums(prompts, copy=0.0)
    token_rate = float(guessing[1].sum() / guessing[0].sum())
    assert 0.05 < token_rate < 0.16  # one digit in ten; 200 tokens: 3 standard deviations is 0.064
    assert set(passkey_table(prompts, guessing).accuracy.values()) == {0.0}  # five digits right: 1e-5
    half = passkey_table(prompts, _hand_made_sums(prompts, copy=0.9))
    assert 0.3 < half.mean_accuracy < 0.9  # 0.91^5 = 0.62 expected
    plot_passkey(copying.accuracy, 4, tmp_path / "passkey.png")
    assert (tmp_path / "passkey.png").read_bytes()[:8] == PNG


def _tp_hits(logits: torch.Tensor, labels: torch.Tensor) -> list[float]:
    """answer_hits with this rank's half of the vocabulary of a head whose logits are `logits`."""
    import torch.distributed as dist

    from ithaca.launcher.eval.answer_logits import answer_hits

    rank, half = dist.get_rank(), logits.shape[-1] // 2
    weight = torch.eye(logits.shape[-1])[rank * half: (rank + 1) * half]
    return answer_hits(logits, weight, labels, group=dist.group.WORLD).tolist()


def _hand_made_logits() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 40, 16, generator=gen)
    logits[0, :5, 3] = logits[0, :5, 11] = 9.0  # ties across the two halves: the lower index wins
    labels = torch.randint(0, 16, (3, 40), generator=gen)
    labels[:, ::3] = logits[:, ::3].argmax(-1)  # a third certainly hit (12 of them in row 0 past the ties)
    labels[0, :5] = torch.tensor([3, 11, 3, 11, 3])
    labels[2, 30:] = -100
    return logits, labels


def _passkey_at_init(data: str, out: str, overrides: tuple[str, ...]) -> dict:
    from ithaca.launcher.config.load import load_config
    from ithaca.launcher.eval.run import TrainingEval
    from ithaca.launcher.train.loop import set_up

    cfg = load_config("debug-cpu", [
        f"data.path={data}", "data.seq_len=64", f"train.output_dir={out}", "train.steps=1", "train.global_batch=4",
        "train.micro_batch=1", "data.workers=1", f"eval.path={data}", f"eval.seq_len={SEQ_LEN}", "eval.batches=1",
        "eval.metrics=[passkey]", "eval.passkey_samples=1", "parallel.dp=1", "parallel.sp=1", *overrides])
    run = set_up(cfg, None)
    table = TrainingEval(cfg, run.engine, run.mesh, run.device, run.output, run.rank).run_passkey()
    # the vocab-parallel argmax on a hand-made head, on the same ranks (one start of processes for both)
    tp_hits = _tp_hits(*_hand_made_logits()) if torch.distributed.get_world_size() == 2 else None
    return {"accuracy": table.accuracy, "log_likelihood": table.log_likelihood, "tp_hits": tp_hits}


def test_sp2_equals_one_process_on_the_passkey_table_and_the_tp_argmax_is_the_whole_vocabularys(
        short_doc_shards, tmp_path):
    from ithaca.launcher.eval.answer_logits import answer_hits

    logits, labels = _hand_made_logits()
    whole = answer_hits(logits, torch.eye(16), labels, group=None).tolist()
    assert whole[0] >= 12 + 3
    assert whole == [float(v) for v in ((logits.argmax(-1) == labels) & (labels >= 0)).sum(1)]

    data = str(short_doc_shards)
    (single,) = run_ranks(_passkey_at_init, 1, data, tempfile.mkdtemp(prefix="ithaca-passkey-"), ())
    per_rank = run_ranks(_passkey_at_init, 2, data, str(tmp_path), ("parallel.sp=2", "parallel.sp_method=ring"))
    assert per_rank[0]["tp_hits"] == per_rank[1]["tp_hits"] == whole
    assert per_rank[0] == per_rank[1] and len(single["accuracy"]) == 10
    assert per_rank[0]["accuracy"] == single["accuracy"]
    for cell, value in single["log_likelihood"].items():
        assert value < 0 and per_rank[0]["log_likelihood"][cell] == pytest.approx(value, rel=1e-5), cell
