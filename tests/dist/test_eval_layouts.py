"""The eval loss and every loss-by-position bucket are the one-process values under every layout.

Weights are drawn whole and then split (as in tests/dist/test_layout_parity.py), so at
initialization every layout holds the same function; the eval batches do not depend on dp
(launcher/eval/batches.py). 256-token eval windows of short packed documents give two position
buckets (0-127 and 128-255) and cut documents across every sp piece.
"""

from __future__ import annotations

import functools
import tempfile

import pytest

from harness import run_ranks

LAYOUTS = {  # name: (config, world size, overrides)
    "sp2-ring": ("debug-cpu", 2, ("parallel.sp=2", "parallel.sp_method=ring")),
    "sp2-ulysses": ("debug-cpu", 2, ("parallel.sp=2", "parallel.sp_method=ulysses")),
    "sp4-usp": ("debug-cpu", 4, ("parallel.sp=4", "parallel.sp_method=usp", "parallel.ulysses_degree=2")),
    "tp2": ("debug-cpu", 2, ("parallel.tp=2",)),
    "pp2": ("debug-cpu", 2, ("parallel.pp=2",)),
    "dp2-zero3": ("debug-cpu", 2, ("parallel.dp=2", "train.zero_stage=3")),
    "hybrid-sp2-lasp2": ("debug-hybrid-cpu", 2, ("parallel.sp=2", "parallel.sp_method=ring")),
    "delta-sp2": ("debug-delta-cpu", 2, ("parallel.sp=2", "parallel.sp_method=ring")),
}


def _eval_at_init(data: str, out: str, config: str, overrides: tuple[str, ...]) -> dict:
    from ithaca.launcher.config.load import load_config
    from ithaca.launcher.eval.run import TrainingEval
    from ithaca.launcher.train.loop import set_up

    cfg = load_config(config, [
        f"data.path={data}", "data.seq_len=64", f"train.output_dir={out}", "train.steps=1", "train.global_batch=4",
        "train.micro_batch=1", "data.workers=1", f"eval.path={data}", "eval.every=1", "eval.seq_len=256",
        "eval.batches=1", "parallel.dp=1", "parallel.sp=1", "parallel.tp=1", "parallel.pp=1", *overrides])
    run = set_up(cfg, None)
    totals = TrainingEval(cfg, run.engine, run.mesh, run.device, run.output, run.rank).run()
    return {"loss": totals.loss, "tokens": totals.tokens, "buckets": totals.bucket_losses(),
            "bucket_tokens": totals.bucket_tokens}


@functools.cache
def _single_process(data: str, config: str) -> dict:
    (result,) = run_ranks(_eval_at_init, 1, data, tempfile.mkdtemp(prefix="ithaca-eval-"), config, ())
    return result


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_eval_loss_and_buckets_equal_one_process(layout, short_doc_shards, tmp_path):
    config, world, overrides = LAYOUTS[layout]
    single = _single_process(str(short_doc_shards), config)
    per_rank = run_ranks(_eval_at_init, world, str(short_doc_shards), str(tmp_path), config, overrides)
    assert single["tokens"] == 4 * 256 and sum(single["bucket_tokens"]) == single["tokens"]
    assert len(single["buckets"]) == 2  # both buckets hold tokens, so both are compared
    assert all(r == per_rank[0] for r in per_rank)  # every rank returns the global totals
    got = per_rank[0]
    assert got["tokens"] == single["tokens"] and got["bucket_tokens"] == single["bucket_tokens"]
    # fp32: layouts differ only in reduction order (split matmuls, all-reduce sums, the ring's
    # log-sum-exp merge), ~1e-7 relative per token; a wrong slice, label or position is O(1).
    assert got["loss"] == pytest.approx(single["loss"], rel=1e-5)
    assert list(got["buckets"]) == list(single["buckets"])
    for bucket, loss in single["buckets"].items():
        assert got["buckets"][bucket] == pytest.approx(loss, rel=1e-5), bucket
