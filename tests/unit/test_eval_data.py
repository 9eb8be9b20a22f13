"""The eval's data: prep's holdout, which folder a run evaluates, the eval windows shared out over
dp ranks, the position buckets and the loss-by-position picture."""

from __future__ import annotations

import json

import pytest
import torch

from ithaca.data import ByteTokenizer, prep, read_manifest
from ithaca.data.shard_reader import read_shard
from ithaca.launcher.config.load import load_config
from ithaca.launcher.config.schema import ConfigError
from ithaca.launcher.eval.batches import eval_folder, eval_windows, rank_batches
from ithaca.launcher.eval.plots import plot_loss_by_position
from ithaca.launcher.eval.positions import bucket_bounds, bucket_of, metric_names


def _documents(folder) -> list[tuple[int, ...]]:
    manifest = read_manifest(folder)
    return [tuple(d.tolist()) for s in manifest.shards for d in read_shard(folder, s)]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    path = tmp_path_factory.mktemp("docs") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": f"document {i}: " + "words " * (i % 7 + 1)}) + "\n"
                            for i in range(40)))
    return path


@pytest.mark.parametrize("holdout, held", [(0.25, 10), (3, 3)])
def test_holdout_is_recorded_reproducible_and_never_trained_on(inputs, tmp_path, holdout, held):
    first = prep([inputs], tmp_path / "a", ByteTokenizer(), shard_tokens=300, holdout=holdout)
    again = prep([inputs], tmp_path / "b", ByteTokenizer(), shard_tokens=300, holdout=holdout)
    assert first.holdout == again.holdout == {"path": "holdout", "documents": held}
    assert read_manifest(tmp_path / "a").holdout == first.holdout and first.documents == 40 - held
    train, evald = _documents(tmp_path / "a"), _documents(tmp_path / "a" / "holdout")
    assert len(evald) == held and not set(train) & set(evald)  # the documents are all distinct
    assert evald == _documents(tmp_path / "b" / "holdout")  # the same documents every time
    if holdout == 3:
        assert [bytes(d).decode() for d in evald] == [f"document {i}: " + "words " * (i % 7 + 1) for i in range(3)]


@pytest.mark.parametrize("holdout", [0, 1.5, -2, 1.0 - 1e-12 + 1])
def test_bad_holdout_is_refused_and_writes_nothing(inputs, tmp_path, holdout):
    with pytest.raises(ValueError, match="--holdout"):
        prep([inputs], tmp_path / "out", ByteTokenizer(), holdout=holdout)
    assert not (tmp_path / "out").exists()


def test_run_evaluates_eval_path_else_the_holdout_of_data_path(inputs, tmp_path):
    prep([inputs], tmp_path / "held", ByteTokenizer(), shard_tokens=300, holdout=5)
    prep([inputs], tmp_path / "plain", ByteTokenizer(), shard_tokens=300)
    assert eval_folder(load_config("debug-cpu", [f"data.path={tmp_path / 'held'}"])) == tmp_path / "held" / "holdout"
    named = load_config("debug-cpu", [f"data.path={tmp_path / 'held'}", f"eval.path={tmp_path / 'plain'}"])
    assert eval_folder(named) == tmp_path / "plain"
    with pytest.raises(ConfigError, match="eval.path=None: data.path=.* without a holdout"):
        eval_folder(load_config("debug-cpu", [f"data.path={tmp_path / 'plain'}"]))
    with pytest.raises(ConfigError, match="eval.seq_len=102: must be divisible by 4"):
        load_config("debug-cpu", [f"data.path={tmp_path / 'plain'}", "parallel.sp=2", "parallel.dp=1",
                                  "parallel.sp_method=ring", "eval.seq_len=102"])
    with pytest.raises(ConfigError, match="eval.seq_len=4: cuts pieces of 2 tokens"):  # the delta rule's halo
        load_config("debug-delta-cpu", [f"data.path={tmp_path / 'plain'}", "parallel.sp=2", "parallel.dp=1",
                                        "eval.seq_len=4"])


def test_eval_windows_are_the_stream_cut_and_every_dp_shares_them(inputs, tmp_path):
    prep([inputs], tmp_path / "d", ByteTokenizer(), shard_tokens=300)
    manifest = read_manifest(tmp_path / "d")
    windows = eval_windows(tmp_path / "d", manifest, seq_len=16, count=8)
    eos = manifest.tokenizer["eos_id"]
    stream = [t for doc in _documents(tmp_path / "d") for t in [*doc, eos]]
    assert windows.tolist() == [stream[k * 16: k * 16 + 17] for k in range(8)]
    with pytest.raises(ValueError, match="fewer than"):
        eval_windows(tmp_path / "d", manifest, seq_len=16, count=10_000)
    one = rank_batches(windows, batches=2, global_batch=4, micro_batch=1, dp=1, dp_rank=0, eos_id=eos)
    per_rank = [rank_batches(windows, batches=2, global_batch=4, micro_batch=2, dp=2, dp_rank=r, eos_id=eos)
                for r in range(2)]
    for k in range(2):  # each eval batch holds the same windows, whatever dp and micro_batch
        rows = lambda micro_batches: [row for b in micro_batches for row in b.tokens.tolist()]  # noqa: E731
        assert rows(one[k]) == rows(per_rank[0][k]) + rows(per_rank[1][k])


def test_position_buckets_and_the_picture(tmp_path):
    assert bucket_bounds(300) == [(0, 127), (128, 255), (256, 299)]
    assert metric_names(256) == ["eval_loss_pos_0_127", "eval_loss_pos_128_255"]
    positions = torch.tensor([0, 127, 128, 255, 256, 511, 512, 4095])
    assert bucket_of(positions).tolist() == [0, 0, 1, 1, 2, 2, 3, 5]
    plot_loss_by_position({10: {(0, 127): 3.0, (128, 255): 2.5}, 20: {(0, 127): 2.0, (128, 255): 1.5}},
                          tmp_path / "p.png")
    import matplotlib.image

    assert matplotlib.image.imread(tmp_path / "p.png").ndim == 3  # a PNG matplotlib reads back


def test_eval_data_read_through_a_command_as_data_path_is(inputs, tmp_path):
    """eval.path takes what data.path takes (data/remote.py); a command's holdout cannot be derived."""
    prep([inputs], tmp_path / "d", ByteTokenizer(), shard_tokens=300, holdout=5)
    local = eval_folder(load_config("debug-cpu", [f"data.path={tmp_path / 'd'}"]))
    piped = eval_folder(load_config("debug-cpu", [f"data.path={tmp_path / 'd'}",
                                                  f"eval.path=pipe:cat {tmp_path / 'd' / 'holdout'}/{{shard}}"]))
    assert piped.startswith("pipe:")
    assert torch.equal(eval_windows(piped, read_manifest(piped), 8, 4), eval_windows(local, read_manifest(local), 8, 4))
    with pytest.raises(ConfigError, match="is a command, and its holdout's place cannot be derived"):
        eval_folder(load_config("debug-cpu", [f"data.path=pipe:cat {tmp_path / 'd'}/{{shard}}"]))
