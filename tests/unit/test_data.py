"""prep -> shards -> packed loader: documents survive byte for byte, windows tile the stream, resume is exact."""

from __future__ import annotations

import gzip
import hashlib
import json

import numpy as np
import pytest
import torch

from ithaca.data import ByteTokenizer, LoaderState, PackedLoader, load_tokenizer, prep, read_manifest
from ithaca.data.loader import iter_documents
from ithaca.data.prep import expand_inputs

DOCS = ["first document\n", "zweites Dokument — ünïcödé\n", "x" * 300, "short", "line one\nline two\n"]


@pytest.fixture
def shards(tmp_path):
    (tmp_path / "in").mkdir()
    for i, text in enumerate(DOCS[:3]):
        (tmp_path / "in" / f"{i}.txt").write_text(text)
    with gzip.open(tmp_path / "in" / "rest.jsonl.gz", "wt") as f:
        for text in DOCS[3:]:
            f.write(json.dumps({"text": text}) + "\n")
    files = expand_inputs([tmp_path / "in"])
    prep(files, tmp_path / "shards", ByteTokenizer(), shard_tokens=100)
    return tmp_path / "shards"


def test_documents_round_trip_byte_for_byte(shards):
    manifest = read_manifest(shards)
    out = [bytes(doc.astype(np.uint8)).decode() for doc in iter_documents(shards, manifest)]
    expected = DOCS[:3] + DOCS[3:]  # folder order: 0.txt 1.txt 2.txt rest.jsonl.gz
    assert out == expected
    assert manifest.documents == len(DOCS) and manifest.tokens == sum(len(d.encode()) for d in DOCS)
    assert len(manifest.shards) > 1  # shard_tokens=100 splits them
    for shard in manifest.shards:
        assert hashlib.sha256((shards / shard.name).read_bytes()).hexdigest() == shard.sha256


def stream(shards, epochs: int) -> np.ndarray:
    docs = [np.append(d.astype(np.int64), 256) for d in iter_documents(shards, read_manifest(shards))]
    return np.concatenate(docs * epochs)


def test_windows_tile_the_stream_across_dp_ranks_and_epochs(shards):
    seq_len, global_batch, steps = 16, 4, 30  # 30 steps * 4 windows * 16 tokens spans several epochs
    loaders = [PackedLoader(shards, seq_len=seq_len, global_batch=global_batch, micro_batch=1, dp=2,
                            dp_rank=r, eos_id=256) for r in range(2)]
    tokens = stream(shards, epochs=1 + steps * global_batch * seq_len // loaders[0].epoch_tokens + 1)
    for step in range(steps):
        per_rank = [loader.next_step() for loader in loaders]
        assert [len(m) for m in per_rank] == [2, 2]  # gradient accumulation 4 / (1 * 2)
        for micro in range(2):
            for rank in range(2):
                k = step * global_batch + micro * 2 + rank  # global window index
                expected = tokens[k * seq_len: k * seq_len + seq_len + 1]
                assert per_rank[rank][micro].tolist() == [expected.tolist()], (step, micro, rank)
    assert loaders[0].state.windows_done == steps * global_batch


@pytest.mark.parametrize("stop_after", [1, 7, 19])
def test_resume_sees_exactly_the_uninterrupted_windows(shards, stop_after):
    def make(state=None):
        return PackedLoader(shards, seq_len=24, global_batch=2, micro_batch=2, dp=1, dp_rank=0, eos_id=256,
                            state=state)

    straight = make()
    reference = [straight.next_step() for _ in range(stop_after + 5)]
    first = make()
    for _ in range(stop_after):
        first.next_step()
    resumed = make(LoaderState(**vars(first.state)))
    for expected in reference[stop_after:]:
        assert all(torch.equal(a, b) for a, b in zip(resumed.next_step(), expected))


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
    manifest = prep([tmp_path / "doc.txt"], tmp_path / "shards", loaded)
    assert manifest.tokenizer["kind"] == "tokenizer.json" and manifest.tokenizer["eos_id"] == 1


def test_bad_tokenizer_specs(tmp_path):
    with pytest.raises(ValueError, match="--tokenizer='nope.json'"):
        load_tokenizer("nope.json")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a readable tokenizer.json"):
        load_tokenizer(str(tmp_path / "bad.json"))


def test_missing_shard_is_named(shards):
    manifest = read_manifest(shards)
    (shards / manifest.shards[1].name).unlink()
    with pytest.raises(ValueError, match=f"shard {manifest.shards[1].name} is missing"):
        read_manifest(shards)


def test_jsonl_line_without_the_field(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "ok"}\n{"body": "no"}\n')
    with pytest.raises(ValueError, match=r"a.jsonl:2: not a JSON object with a string field 'text'"):
        prep([tmp_path / "a.jsonl"], tmp_path / "out", ByteTokenizer())
    assert not (tmp_path / "out").exists()
