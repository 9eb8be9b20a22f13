"""The packed loader: every document once per epoch over nodes x workers x dp ranks, exact resume,
deterministic shuffles, mixtures, and unreadable shards."""

from __future__ import annotations

import json
import multiprocessing
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from ithaca.data import ByteTokenizer, PackedLoader, ShardError, Source, prep, read_manifest
from ithaca.data.split import stream_shards

EOS = 256
SEQ_LEN = 32


def write_documents(folder: Path, texts: list[str], shard_tokens: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    prep([folder / "docs.jsonl"], folder / "shards", ByteTokenizer(), shard_tokens=shard_tokens)
    return folder / "shards"


def numbered_texts(n: int, tag: str = "doc") -> list[str]:
    return [f"<{tag} {i}>" + "word " * (i % 23) for i in range(n)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[str]]:
    """300 distinct documents in 20-odd shards."""
    texts = numbered_texts(300)
    return write_documents(tmp_path_factory.mktemp("corpus"), texts, shard_tokens=1000), texts


def make_loader(path, *, dp=1, dp_rank=0, workers=0, micro_batch=2, grad_accum=2, state=None, **kw) -> PackedLoader:
    sources = path if isinstance(path, list) else [Source(path)]
    return PackedLoader(sources, seq_len=SEQ_LEN, micro_batch=micro_batch, grad_accum=grad_accum, dp=dp,
                        dp_rank=dp_rank, workers=workers, state=state, **kw)


def stream_tokens(windows: list[np.ndarray]) -> np.ndarray:
    """Consecutive windows of one stream share one token: rebuild the stream they tile."""
    return np.concatenate([w[:SEQ_LEN] for w in windows])


def split_documents(tokens: np.ndarray) -> list[str]:
    ends = np.flatnonzero(tokens == EOS)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [bytes(tokens[a:b].astype(np.uint8)).decode() for a, b in zip(starts, ends)]


def test_one_stream_without_shuffle_gives_the_documents_back_byte_for_byte(corpus):
    path, texts = corpus
    loader = make_loader(path, shuffle=False)
    epoch_tokens = read_manifest(path).tokens + len(texts)
    windows = []
    while len(windows) * SEQ_LEN < epoch_tokens + SEQ_LEN:
        windows += [row.numpy() for micro in loader.next_step() for row in micro]
    tokens = stream_tokens(windows)
    assert split_documents(tokens[:epoch_tokens]) == texts
    assert split_documents(tokens[epoch_tokens:])[0] == texts[0]  # the next epoch starts over
    assert loader.epoch == 1


def test_one_epoch_over_2_nodes_x_2_workers_x_2_dp_ranks_reads_every_document_once(corpus):
    path, texts = corpus
    manifest = read_manifest(path)
    nodes, dp_per_node, workers = 2, 2, 2
    dp = nodes * dp_per_node  # data-parallel ranks span the nodes
    n_streams = dp * workers
    seen = Counter()
    for dp_rank in range(dp):
        loader = make_loader(path, dp=dp, dp_rank=dp_rank, workers=workers, seed=7)
        per_stream = {w: [] for w in range(workers)}
        epoch_tokens = {}
        for w in range(workers):  # what one epoch of this stream holds, by the manifest
            shards = stream_shards(len(manifest.shards), n_streams, dp_rank * workers + w, epoch=0, seed=7, shuffle=True)
            assert shards, "every stream reads at least one shard"
            epoch_tokens[w] = sum(manifest.shards[s].tokens + manifest.shards[s].documents for s in shards)
        micro_index = 0
        while any(len(per_stream[w]) * SEQ_LEN < epoch_tokens[w] for w in per_stream):
            for micro in loader.next_step():
                per_stream[micro_index % workers] += [row.numpy() for row in micro]  # worker j % workers
                micro_index += 1
        for w, windows in per_stream.items():
            seen.update(split_documents(stream_tokens(windows)[:epoch_tokens[w]]))
    assert sorted(seen) == sorted(texts) and set(seen.values()) == {1}


def collect(loader: PackedLoader, steps: int) -> list[list[np.ndarray]]:
    return [[m.numpy() for m in loader.next_step()] for _ in range(steps)]


def saved(loaders: list[PackedLoader]) -> list[dict]:
    """Every dp rank's position as a checkpoint keeps it: plain data (a JSON round trip makes keys str)."""
    return json.loads(json.dumps([loader.state_dict() for loader in loaders]))


@pytest.mark.parametrize("workers, grad_accum", [(0, 2), (2, 3)])  # 3 micro-batches over 2 workers: the
def test_resume_at_several_points_gives_the_uninterrupted_stream(corpus, workers, grad_accum):  # rotation moves
    path, _ = corpus
    straight = collect(make_loader(path, dp=2, dp_rank=1, workers=workers, grad_accum=grad_accum), 40)
    for stop in (1, 5, 17, 30):  # 30 steps are past the first epoch of every stream
        first = [make_loader(path, dp=2, dp_rank=r, workers=workers, grad_accum=grad_accum) for r in range(2)]
        for loader in first:
            collect(loader, stop)
            loader.close()
        resumed = make_loader(path, dp=2, dp_rank=1, workers=workers, grad_accum=grad_accum, state=saved(first))
        for expected, got in zip(straight[stop:], collect(resumed, 40 - stop)):
            assert all(np.array_equal(a, b) for a, b in zip(expected, got)), f"resumed after {stop} steps"


def test_shuffle_is_fixed_by_seed_and_changes_with_epoch_and_seed(corpus):
    path, _ = corpus
    n = len(read_manifest(path).shards)
    orders = {(seed, epoch): stream_shards(n, 1, 0, epoch, seed, shuffle=True) for seed in (0, 1) for epoch in (0, 1)}
    assert orders[0, 0] == stream_shards(n, 1, 0, 0, 0, shuffle=True)
    assert len({tuple(o) for o in orders.values()}) == 4 and all(sorted(o) == list(range(n)) for o in orders.values())
    a, b = (collect(make_loader(path, seed=s), 3) for s in (0, 1))
    assert collect(make_loader(path, seed=0), 3)[0][0].tolist() == a[0][0].tolist()
    assert a[0][0].tolist() != b[0][0].tolist()


def test_a_weighted_mixture_draws_each_dataset_by_its_weight(tmp_path):
    letters = write_documents(tmp_path / "letters", ["abc" * (i % 20 + 1) for i in range(200)], shard_tokens=800)
    digits = write_documents(tmp_path / "digits", ["123" * (i % 20 + 1) for i in range(200)], shard_tokens=800)
    sources = [Source(letters, 3.0), Source(digits, 1.0)]

    def from_letters(window: np.ndarray) -> bool:  # each window comes from one dataset: any byte tells which
        return chr(window[0] if window[0] != EOS else window[1]) in "abc"

    loader = make_loader(sources, micro_batch=1, grad_accum=1)
    rows = [loader.next_step()[0][0].numpy() for _ in range(800)]
    assert all(set(map(chr, r[r != EOS])) <= (set("abc") if from_letters(r) else set("123")) for r in rows)
    share = sum(map(from_letters, rows)) / len(rows)
    assert 0.70 < share < 0.80  # 3:1 -> 0.75; 800 draws: sd 0.015
    resumed = make_loader(sources, micro_batch=1, grad_accum=1, state=saved([loader]))
    straight = make_loader(sources, micro_batch=1, grad_accum=1)
    for _ in range(800):
        straight.next_step()
    assert all(np.array_equal(resumed.next_step()[0], straight.next_step()[0]) for _ in range(50))


def damaged_copy(corpus, tmp_path, damage: str) -> tuple[Path, str]:
    """A copy of the corpus with its second shard corrupted, truncated or deleted."""
    import shutil

    path = tmp_path / "shards"
    shutil.copytree(corpus[0], path)
    name = read_manifest(path).shards[1].name
    data = (path / name).read_bytes()
    if damage == "corrupt":
        (path / name).write_bytes(data[:2000] + bytes([data[2000] ^ 0xFF]) + data[2001:])
    elif damage == "truncated":
        (path / name).write_bytes(data[:len(data) // 2])
    else:
        (path / name).unlink()
    return path, name


@pytest.mark.parametrize("damage", ["corrupt", "truncated", "missing"])
def test_an_unreadable_shard_is_an_error_naming_it(corpus, tmp_path, damage):
    path, name = damaged_copy(corpus, tmp_path, damage)
    loader = make_loader(path, shuffle=False, workers=1)
    with pytest.raises(ShardError, match=f"shard {path / name}: " + ("missing" if damage == "missing" else "corrupt")):
        collect(loader, 200)


@pytest.mark.parametrize("damage", ["corrupt", "missing"])
def test_on_error_skip_passes_over_the_shard_and_counts_it(corpus, tmp_path, damage):
    path, name = damaged_copy(corpus, tmp_path, damage)
    manifest = read_manifest(path)
    epoch_tokens = manifest.tokens + manifest.documents - manifest.shards[1].tokens - manifest.shards[1].documents
    loader = make_loader(path, shuffle=False, on_error="skip", micro_batch=1, grad_accum=1)
    windows = [loader.next_step()[0][0].numpy() for _ in range(epoch_tokens // SEQ_LEN + 1)]
    assert loader.skipped_shards == 1
    first, second = manifest.shards[0].documents, manifest.shards[1].documents
    texts = corpus[1]
    assert split_documents(stream_tokens(windows)[:epoch_tokens]) == texts[:first] + texts[first + second:]
    for _ in range(epoch_tokens // SEQ_LEN + 2):  # into the next epoch: skipped again, counted again
        loader.next_step()
    assert loader.skipped_shards == 2


def test_more_streams_than_shards_and_a_state_that_is_not_every_ranks_are_refused(corpus, tmp_path):
    path, _ = corpus
    n = len(read_manifest(path).shards)
    with pytest.raises(ValueError, match=f"has {n} shards, fewer than the {2 * n} data streams"):
        make_loader(path, dp=n, workers=2)
    one_rank = make_loader(path, dp=3, workers=1)
    one_rank.next_step()
    with pytest.raises(ValueError, match="state: want every dp rank's loader state_dict"):  # 3 streams, 2 ranks
        make_loader(path, state=[one_rank.state_dict()] * 2)
    other = write_documents(tmp_path / "other", numbered_texts(40, "other"), shard_tokens=200)
    with pytest.raises(ValueError, match=r"state: the data position is for 1 data folder\(s\), this run reads 2"):
        make_loader([Source(path), Source(other)], state=[one_rank.state_dict()])


def test_batches_are_the_windows_with_documents_marked_at_the_tokenizers_eos(corpus):
    from ithaca.data.batch import Batch

    path, _ = corpus
    windows, masked, plain = (make_loader(path, seed=3, **kw) for kw in ({}, {}, {"document_mask": False}))
    assert masked.eos_id == EOS == read_manifest(path).tokenizer["eos_id"]
    documents = 0
    for _ in range(3):
        for w, b, p in zip(windows.next_step(), masked.next_batches(), plain.next_batches()):
            assert all(torch.equal(x, y) for x, y in zip(b.fields(), Batch.from_window(w, EOS).fields()))
            assert torch.equal(p.tokens, w[:, :-1]) and p.doc_ids is None and p.resets is None
            documents += int(b.resets.sum())
    assert documents > 0  # some window held a document start after its first token


def test_datasets_whose_documents_end_with_different_eos_ids_are_refused(corpus, tmp_path):
    path, _ = corpus
    other = tmp_path / "other"
    shutil.copytree(path, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["tokenizer"]["eos_id"] = 0
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"end documents with different EOS ids \[0, 256\]"):
        make_loader([Source(path), Source(other)])


def test_close_stops_the_workers_and_an_open_loader_does_not_hold_up_exit(corpus):
    """Workers ignore stop signals (a job's SIGTERM must not kill them before the checkpoint), so
    the interpreter's exit cannot stop them by signal: an uncaught error in training once left
    the process waiting for them forever."""
    path, _ = corpus
    others = set(multiprocessing.active_children())  # earlier tests' loaders may not be collected yet
    loader = make_loader(path, workers=2)
    loader.next_step()
    workers = set(multiprocessing.active_children()) - others
    assert len(workers) == 2
    loader.close()
    assert not workers & set(multiprocessing.active_children())
    crash = ("from pathlib import Path; from ithaca.data import PackedLoader, Source\n"
             f"loader = PackedLoader([Source(Path({str(path)!r}))], seq_len=8, micro_batch=1, grad_accum=1, "
             "dp=1, dp_rank=0, workers=2)\n"
             "loader.next_step()\n"
             "raise RuntimeError('error in training')\n")
    done = subprocess.run([sys.executable, "-c", crash], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "RuntimeError: error in training" in done.stderr
