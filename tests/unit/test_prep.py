"""`ithaca prep`: inputs of every kind, tokenizers, parallel workers, interruption and resumption."""

from __future__ import annotations

import gzip
import hashlib
import json

import sys

import numpy as np
import pytest

from ithaca.data import ByteTokenizer, load_tokenizer, prep, read_manifest
from ithaca.data.inputs import expand_inputs
from ithaca.data.shard_reader import read_shard

DOCS = ["first document\n", "zweites Dokument — ünïcödé\n", "x" * 300, "short", "line one\nline two\n"]


def stored_documents(folder) -> list[str]:
    manifest = read_manifest(folder)
    return [bytes(d.astype(np.uint8)).decode() for s in manifest.shards for d in read_shard(folder, s)]


@pytest.fixture
def inputs(tmp_path):
    (tmp_path / "in").mkdir()
    for i, text in enumerate(DOCS[:3]):
        (tmp_path / "in" / f"{i}.txt").write_text(text)
    with gzip.open(tmp_path / "in" / "rest.jsonl.gz", "wt") as f:
        for text in DOCS[3:]:
            f.write(json.dumps({"text": text}) + "\n\n")  # blank lines are not documents
    return expand_inputs([tmp_path / "in"])


def test_text_and_gzipped_jsonl_are_stored_byte_for_byte(inputs, tmp_path):
    manifest = prep(inputs, tmp_path / "shards", ByteTokenizer(), shard_tokens=100)
    assert stored_documents(tmp_path / "shards") == DOCS  # folder order: 0.txt 1.txt 2.txt rest.jsonl.gz
    assert manifest.documents == len(DOCS) and manifest.tokens == sum(len(d.encode()) for d in DOCS)
    assert len(manifest.shards) > 1  # shard_tokens=100 splits them
    for shard in manifest.shards:
        assert hashlib.sha256((tmp_path / "shards" / shard.name).read_bytes()).hexdigest() == shard.sha256
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == ["manifest.json"] + [s.name for s in manifest.shards]


@pytest.fixture
def small_batches(monkeypatch):
    """Many tokenizer tasks for a small input (a name the `prep` function shadows in ithaca.data)."""
    monkeypatch.setattr(sys.modules["ithaca.data.prep"], "BATCH_BYTES", 500)


def many_documents(tmp_path, n: int = 400):
    lines = "".join(json.dumps({"text": f"document {i}: " + "abc " * (i % 37)}) + "\n" for i in range(n))
    (tmp_path / "docs.jsonl").write_text(lines)
    return [tmp_path / "docs.jsonl"]


def test_worker_processes_write_the_same_shards(tmp_path, small_batches):
    files = many_documents(tmp_path)
    one = prep(files, tmp_path / "one", ByteTokenizer(), shard_tokens=2000)
    two = prep(files, tmp_path / "two", ByteTokenizer(), shard_tokens=2000, workers=2)
    assert one == two and len(one.shards) > 5


class InterruptingTokenizer(ByteTokenizer):
    """Stands for a user's Ctrl-C after `after` documents."""

    def __init__(self, after: int):
        super().__init__()
        object.__setattr__(self, "left", after)

    def encode(self, text):
        object.__setattr__(self, "left", self.left - 1)
        if self.left < 0:
            raise KeyboardInterrupt
        return super().encode(text)


def test_an_interrupted_prep_keeps_its_shards_and_the_rerun_continues_after_them(tmp_path, small_batches):
    files = many_documents(tmp_path)
    whole = prep(files, tmp_path / "whole", ByteTokenizer(), shard_tokens=2000)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        prep(files, out, InterruptingTokenizer(after=250), shard_tokens=2000)
    staging = tmp_path / ".resumed.partial"
    assert not out.exists()  # training cannot mistake half a dataset for data
    finished = sorted(staging.glob("shard-*.tar"))  # the shard being written is still shard-N.tar.tmp
    assert len(finished) >= 3 and len(list(staging.glob("*.tar.tmp"))) == 1
    inodes = {p.name: p.stat().st_ino for p in finished}
    resumed = prep(files, out, ByteTokenizer(), shard_tokens=2000)
    assert resumed == whole and stored_documents(out) == stored_documents(tmp_path / "whole")
    assert all((out / name).stat().st_ino == ino for name, ino in inodes.items())  # kept, not rewritten
    assert not staging.exists()


def test_a_rerun_with_other_options_starts_over(tmp_path, small_batches):
    files = many_documents(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        prep(files, tmp_path / "out", InterruptingTokenizer(after=250), shard_tokens=2000)
    redone = prep(files, tmp_path / "out", ByteTokenizer(), shard_tokens=3000)
    assert redone == prep(files, tmp_path / "fresh", ByteTokenizer(), shard_tokens=3000)


def test_hugging_face_tokenizer_json(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "</s>": 1, "hello": 2, "world": 3}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    loaded = load_tokenizer(str(tmp_path / "tokenizer.json"))
    assert loaded.eos_id == 1 and loaded.vocab_size == 4
    assert loaded.encode("hello world hello").tolist() == [2, 3, 2]
    (tmp_path / "doc.txt").write_text("hello world")
    manifest = prep([tmp_path / "doc.txt"], tmp_path / "shards", loaded, workers=2)
    assert manifest.tokenizer["kind"] == "tokenizer.json" and manifest.tokenizer["eos_id"] == 1
    assert [d.tolist() for d in read_shard(tmp_path / "shards", manifest.shards[0])] == [[2, 3]]


def test_bad_tokenizer_specs(tmp_path):
    with pytest.raises(ValueError, match="--tokenizer='nope.json'"):
        load_tokenizer("nope.json")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a readable tokenizer.json"):
        load_tokenizer(str(tmp_path / "bad.json"))


def test_jsonl_line_without_the_field(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "ok"}\n{"body": "no"}\n')
    with pytest.raises(ValueError, match=r"a.jsonl:2: not a JSON object with a string field 'text'"):
        prep([tmp_path / "a.jsonl"], tmp_path / "out", ByteTokenizer())
    assert not (tmp_path / "out").exists()


def test_empty_input_is_refused(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": ""}\n\n')
    with pytest.raises(ValueError, match="hold no text"):
        prep([tmp_path / "a.jsonl"], tmp_path / "out", ByteTokenizer())
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()


def test_cli_holdout_sets_documents_aside_and_says_so(inputs, tmp_path, capsys):
    from ithaca.launcher.cli.main import main

    out = tmp_path / "out"
    args = ["prep", "--input", str(tmp_path / "in"), "--workers", "1", "--holdout", "2"]
    assert main([*args, "--output", str(out)]) == 0
    tokens = sum(len(text.encode()) for text in DOCS[2:])
    assert capsys.readouterr().out == f"wrote 1 shards, 3 documents, {tokens} tokens to {out}; 2 documents held " \
                                      f"out in {out / 'holdout'}\n"
    assert stored_documents(out) == DOCS[2:] and stored_documents(out / "holdout") == DOCS[:2]
    assert read_manifest(out).holdout == {"path": "holdout", "documents": 2}

    assert main([*args[:-1], "0", "--output", str(tmp_path / "none")]) == 1
    assert capsys.readouterr().err == "ithaca: --holdout=0.0: give a number of documents (1 or more) or a fraction " \
                                      "between 0 and 1\n"
    assert not (tmp_path / "none").exists()
