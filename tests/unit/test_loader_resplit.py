"""A loader position continued under another dp x workers (data/resplit.py). Counted by document
text across each switch: every document of the epoch is read once, and one that a stream had
partly read is continued once, from its next token; the same stream count under another dp
continues each stream exactly."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

from ithaca.data import ByteTokenizer, PackedLoader, Source, prep, read_manifest
from ithaca.data.shard_reader import read_shard
from ithaca.data.split import document_order, stream_segments
from ithaca.data.stream import Cursor, segments_from_rows

EOS = 256
SEQ_LEN = 16
SEED = 3


def write_shards(root: Path, texts: list[str]) -> Path:
    root.mkdir(parents=True)
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    prep([root / "docs.jsonl"], root / "shards", ByteTokenizer(), shard_tokens=450)
    return root / "shards"


def id_texts(tag: str, n: int) -> list[str]:
    """Documents of 9 to ~90 bytes that start with their id: only a document's first piece starts with '<'."""
    return [f"<{tag} {i}>" + "ab " * (i * 7 % 29) for i in range(n)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[str]]:
    """160 documents in a dozen shards of unequal size."""
    texts = id_texts("doc", 160)
    return write_shards(tmp_path_factory.mktemp("resplit") / "docs", texts), texts


class Run:
    """One run of a layout: each rank's windows (one per step), filed by global stream with the
    dataset each came from and that dataset's cursor after it."""

    def __init__(self, sources: list[Source], dp: int, workers: int, state: list[dict] | None = None):
        self.per_rank, self.n_streams = max(workers, 1), dp * max(workers, 1)
        self.loaders = [PackedLoader(sources, seq_len=SEQ_LEN, micro_batch=1, grad_accum=1, dp=dp, dp_rank=rank,
                                     workers=workers, seed=SEED, state=state) for rank in range(dp)]
        self.reads: dict[int, list[tuple[np.ndarray, int, Cursor]]] = defaultdict(list)
        self.at = {rank * self.per_rank + local: [Cursor(*d["cursor"]) for d in s["datasets"]]
                   for rank, loader in enumerate(self.loaders) for local, s in loader.stream_states.items()}
        self.plans: dict[int, list[dict]] = {}

    def step(self) -> None:
        for rank, loader in enumerate(self.loaders):
            local = loader.micro_batches % self.per_rank  # the rotation of data/loader.py
            window = loader.next_step()[0][0].numpy()
            stream = rank * self.per_rank + local
            now = [Cursor(*d["cursor"]) for d in loader.stream_states[local]["datasets"]]
            [dataset] = [i for i, c in enumerate(now) if c != self.at.get(stream, [Cursor()] * len(now))[i]]
            self.reads[stream].append((window, dataset, now[dataset]))
            self.at[stream] = now

    def epochs_at(self, dataset: int) -> set[int]:
        return {cursors[dataset].epoch for cursors in self.at.values()}

    def finish(self) -> list[dict]:
        """Every rank's position as a checkpoint keeps it (plain data); the loaders are closed."""
        states = json.loads(json.dumps([loader.state_dict() for loader in self.loaders]))
        for loader in self.loaders:
            loader.close()
        self.plans = {rank * self.per_rank + int(local): s["datasets"]
                      for rank, state in enumerate(states) for local, s in state["stream_states"].items()}
        return states


def pieces(tokens: np.ndarray) -> list[str]:
    """The text between EOS tokens; the last element is what follows the last EOS."""
    ends = np.flatnonzero(tokens == EOS)
    bounds = zip(np.concatenate([[0], ends + 1]), np.concatenate([ends, [tokens.size]]))
    return [bytes(tokens[a:b].astype(np.uint8)).decode() for a, b in bounds]


class Shards:
    """Where a stream's cursor is, in documents, read from the shards themselves."""

    def __init__(self, path: Path):
        self.path, self.manifest = path, read_manifest(path)

    @lru_cache(maxsize=None)
    def texts(self, shard: int, epoch: int) -> tuple[str, ...]:
        docs = read_shard(self.path, self.manifest.shards[shard])
        order = document_order(len(docs), shard, epoch, SEED, shuffle=True)
        return tuple(bytes(docs[i].astype(np.uint8)).decode() for i in order)

    def shards(self, cursor: Cursor, n_streams: int, stream: int, plan: dict) -> list[int]:
        return [s.shard for s in stream_segments(len(self.manifest.shards), n_streams, stream, cursor.epoch, SEED, True,
                                                 leftover=segments_from_rows(plan.get("leftover", [])),
                                                 normal_from=plan.get("normal_from", 0))]

    def text_at(self, cursor: Cursor, n_streams: int, stream: int, plan: dict) -> str:
        return self.texts(self.shards(cursor, n_streams, stream, plan)[cursor.shard], cursor.epoch)[cursor.doc]

    def tokens_before(self, cursor: Cursor, n_streams: int, stream: int) -> int:
        """Tokens a stream reads in the cursor's epoch before the cursor, where whole shards are dealt out."""
        shards = self.shards(cursor, n_streams, stream, {})
        whole = sum(len(t) + 1 for s in shards[:cursor.shard] for t in self.texts(s, cursor.epoch))
        earlier = self.texts(shards[cursor.shard], cursor.epoch)[:cursor.doc]
        return whole + sum(len(t) + 1 for t in earlier) + cursor.offset


def count_documents(path: Path, runs: list[Run], dataset: int, end_epoch: int) -> Counter:
    """Documents of `dataset` read by `runs` (the last one up to `end_epoch`, which it has begun in every
    stream) in epochs before `end_epoch`, by text. Checks that a document a stream stopped inside
    is continued once, from its next token, by a later run, and that none is left unfinished."""
    shards = Shards(path)
    seen, unfinished = Counter(), Counter()  # unfinished: the rest of each partly read document
    for k, run in enumerate(runs):
        left = Counter()
        for stream in range(run.n_streams):
            windows = [(w, c) for w, d, c in run.reads[stream] if d == dataset]
            if k == len(runs) - 1:  # up to the window in which the stream's share of the epochs ends
                ends = [i for i, (_, c) in enumerate(windows) if c.epoch >= end_epoch]
                windows = windows[:ends[0] + 1] if ends else []  # none: the stream began at end_epoch
            if not windows:
                continue
            tokens = np.concatenate([w[:SEQ_LEN] for w, _ in windows])  # a window's last token is the next's first
            cursor = windows[-1][1]
            if k == len(runs) - 1:
                assert cursor.epoch == end_epoch
                tokens = tokens[:tokens.size - shards.tokens_before(cursor, run.n_streams, stream)]
            *done, partial = pieces(tokens)
            for piece in done:
                if piece.startswith("<"):
                    seen[piece] += 1
                else:
                    assert unfinished[piece] > 0, f"{piece!r} continues no document a stream stopped inside"
                    unfinished[piece] -= 1
            if cursor.offset and k < len(runs) - 1:  # the stream stopped inside a document
                text = shards.text_at(cursor, run.n_streams, stream, run.plans[stream][dataset])
                assert text[:cursor.offset].endswith(partial)
                if cursor.offset == len(partial):  # the stream began the document
                    seen[text] += 1
                else:
                    assert unfinished[text[cursor.offset - len(partial):]] > 0
                    unfinished[text[cursor.offset - len(partial):]] -= 1
                left[text[cursor.offset:]] += 1
            else:
                assert partial == "", "a stream's share of an epoch ends with a whole document"
        unfinished += left
    assert not +unfinished, f"partly read documents never finished: {+unfinished}"
    return seen


def first_unstarted_epoch(states: list[dict], dataset: int = 0) -> int:
    return 1 + max(s["datasets"][dataset]["cursor"][0] for st in states for s in st["stream_states"].values())


def read_to_epoch(run: Run, epoch: int, datasets: int = 1) -> None:
    """Step until every stream has begun `epoch` in every dataset."""
    while min(min(run.epochs_at(d)) for d in range(datasets)) < epoch:
        run.step()
    run.finish()


@pytest.mark.parametrize("old, new", [((2, 1), (1, 1)), ((1, 2), (2, 2)), ((2, 0), (4, 0)), ((3, 0), (2, 1)),
                                      ((4, 1), (1, 0))])
def test_another_stream_count_reads_the_rest_of_the_epoch_once(corpus, old, new):
    path, texts = corpus
    first = Run([Source(path)], *old)
    for _ in range(23):
        first.step()
    states = first.finish()
    assert first_unstarted_epoch(states) == 1, "the switch comes inside every old stream's epoch 0"
    assert any(reads[-1][2].offset for reads in first.reads.values()), "a stream stopped inside a document"
    second = Run([Source(path)], *new, state=states)
    read_to_epoch(second, 1)
    assert count_documents(path, [first, second], 0, end_epoch=1) == Counter(texts)


def test_a_switch_while_streams_are_in_two_epochs_reads_each_of_them_once(corpus):
    path, texts = corpus
    first = Run([Source(path)], 2, 0)
    while max(first.epochs_at(0), default=0) == 0:
        first.step()
    assert first.epochs_at(0) == {0, 1}  # one stream has begun epoch 1, the other is still in epoch 0
    states = first.finish()
    assert first_unstarted_epoch(states) == 2
    second = Run([Source(path)], 3, 0, state=states)
    read_to_epoch(second, 2)
    assert count_documents(path, [first, second], 0, end_epoch=2) == Counter(texts * 2)


def test_switching_again_before_the_epoch_ends_still_reads_it_once(corpus):
    """dp2 -> dp3 -> dp1 inside epoch 0: the middle run stops inside the pieces a re-split gave it."""
    path, texts = corpus
    first = Run([Source(path)], 2, 0)
    for _ in range(15):
        first.step()
    middle = Run([Source(path)], 3, 0, state=first.finish())
    for _ in range(17):
        middle.step()
    states = middle.finish()
    assert first_unstarted_epoch(states) == 1
    last = Run([Source(path)], 1, 0, state=states)
    read_to_epoch(last, 1)
    assert count_documents(path, [first, middle, last], 0, end_epoch=1) == Counter(texts)


def test_a_mixture_is_re_split_per_dataset(tmp_path):
    texts = {"a": id_texts("a", 90), "b": id_texts("b", 70)}
    paths = {tag: write_shards(tmp_path / tag, t) for tag, t in texts.items()}
    sources = [Source(paths["a"], 2.0), Source(paths["b"], 1.0)]
    first = Run(sources, 2, 0)
    for _ in range(30):
        first.step()
    states = first.finish()
    assert first_unstarted_epoch(states, 0) == first_unstarted_epoch(states, 1) == 1
    second = Run(sources, 1, 2, state=states)
    read_to_epoch(second, 1, datasets=2)
    for dataset, tag in enumerate(texts):
        assert count_documents(paths[tag], [first, second], dataset, end_epoch=1) == Counter(texts[tag])


def test_the_same_stream_count_under_another_dp_continues_every_stream_exactly(corpus):
    path, _ = corpus
    straight = Run([Source(path)], 4, 1)
    for _ in range(30):
        straight.step()
    straight.finish()
    first = Run([Source(path)], 2, 2)  # 4 streams: rank r's worker w is stream 2r + w
    for _ in range(20):  # 10 windows from each stream
        first.step()
    second = Run([Source(path)], 4, 1, state=first.finish())
    for _ in range(20):
        second.step()
    second.finish()
    for stream in range(4):
        resumed = [w for run in (first, second) for w, _, _ in run.reads[stream]]
        assert len(resumed) == 30
        assert all(np.array_equal(a, b) for (a, _, _), b in zip(straight.reads[stream], resumed)), f"stream {stream}"
