"""The eval batches: the same windows at every eval, under every layout and across resumes.

The eval folder's documents are read in manifest order (shards, then documents as stored), each
followed by EOS as in training, and cut into windows of seq_len + 1 tokens exactly as a training
stream cuts them (data/stream.py: window k holds tokens [k*L, k*L + L + 1)). `eval.batches`
batches of `train.global_batch` windows are the first windows of that stream; nothing depends on
dp, data workers, shuffling or a loader's state. Each dp rank takes a contiguous share of every
batch and cuts it into micro-batches of `train.micro_batch` windows, so the windows evaluated,
summed over dp ranks, are the same set for any layout.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ithaca.data.batch import Batch
from ithaca.data.remote import is_remote, location_text
from ithaca.data.shard_reader import read_shard
from ithaca.data.shards import Manifest, read_manifest
from ithaca.launcher.config.schema import ConfigError, RunConfig
from ithaca.log import get_logger

log = get_logger(__name__)


def eval_folder(cfg: RunConfig) -> Path | str:
    """The folder to evaluate on: eval.path (a local folder or, as data.path, a URL), else the holdout
    `ithaca prep --holdout` recorded in data.path's manifest. Raises ConfigError when there is neither."""
    if cfg.eval.path is not None:
        return location_text(cfg.eval.path) if is_remote(cfg.eval.path) else Path(cfg.eval.path)
    if cfg.data.path is None:
        raise ConfigError("eval.path", None, "a data.mixture has no one holdout; name the eval shards with eval.path")
    holdout = read_manifest(cfg.data.path).holdout
    if holdout is None:
        raise ConfigError("eval.path", None, f"data.path={cfg.data.path!r} was prepped without a holdout; prep it "
                          "with `ithaca prep --holdout N`, or name eval shards with eval.path")
    return _inside(cfg.data.path, holdout["path"])


def scores_windows(cfg: RunConfig) -> bool:
    """Whether eval.metrics needs the forward pass over the eval windows (loss or positions)."""
    return bool({"loss", "positions"} & set(cfg.eval.metrics))


def say_eval_folder(cfg: RunConfig, folder: Path | str) -> None:
    """Log, once per eval set-up, that the eval uses data.path's holdout when eval.path is not set."""
    if cfg.eval.path is None:
        documents = read_manifest(cfg.data.path).holdout["documents"]
        log.info(f"eval: eval.path not set, evaluating on the holdout of data.path ({folder}, {documents} documents)")


def _inside(location: str, name: str) -> Path | str:
    """Sub-folder `name` of a shard folder, local or a URL."""
    if not is_remote(location):
        return Path(location) / name
    if location.startswith("pipe:"):
        raise ConfigError("eval.path", None, f"data.path={location!r} is a command, and its holdout's place cannot "
                          "be derived from it; name the holdout with eval.path")
    return f"{location_text(location).rstrip('/')}/{name}"


def eval_windows(folder: Path | str, manifest: Manifest, seq_len: int, count: int) -> torch.Tensor:
    """The first `count` windows [count, seq_len + 1] int64 of the folder's documents in manifest order.
    Raises ValueError if the folder holds fewer tokens than that."""
    need = count * seq_len + 1
    eos = np.array([manifest.tokenizer["eos_id"]], dtype=np.int64)
    pieces, have = [], 0
    for info in manifest.shards:
        for doc in read_shard(folder, info):
            pieces += [doc.astype(np.int64), eos]
            have += doc.size + 1
        if have >= need:
            break
    if have < need:
        raise ValueError(f"eval data {folder} holds {have} tokens with EOS, fewer than the {need} that "
                         f"{count} windows of {seq_len} need (eval.batches x train.global_batch windows); "
                         "use fewer eval.batches, a shorter eval.seq_len or a bigger holdout")
    stream = torch.from_numpy(np.concatenate(pieces)[:need])
    return torch.stack([stream[k * seq_len: k * seq_len + seq_len + 1] for k in range(count)])


def rank_batches(windows: torch.Tensor, *, batches: int, global_batch: int, micro_batch: int, dp: int,
                 dp_rank: int, eos_id: int | None) -> list[list[Batch]]:
    """Dp rank `dp_rank`'s micro-batches of each eval batch: its contiguous share of the batch's
    `global_batch` windows, `micro_batch` at a time, as whole Batches (documents marked at `eos_id`)."""
    share = global_batch // dp
    out = []
    for k in range(batches):
        mine = windows[k * global_batch + dp_rank * share: k * global_batch + (dp_rank + 1) * share]
        out.append([Batch.from_window(mine[i: i + micro_batch], eos_id) for i in range(0, share, micro_batch)])
    return out


def run_batches(cfg: RunConfig, folder: Path | str, dp: int, dp_rank: int) -> list[list[Batch]]:
    """This dp rank's eval micro-batches of the eval data in `folder` for the run `cfg`."""
    manifest = read_manifest(folder)
    t = cfg.train
    windows = eval_windows(folder, manifest, cfg.eval_seq_len, cfg.eval.batches * t.global_batch)
    eos_id = manifest.tokenizer["eos_id"] if cfg.data.document_mask else None
    return rank_batches(windows, batches=cfg.eval.batches, global_batch=t.global_batch,
                        micro_batch=t.micro_batch, dp=dp, dp_rank=dp_rank, eos_id=eos_id)
