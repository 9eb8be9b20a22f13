"""`ithaca check`'s two sides on the rank harness: each correct layout matches its one-process twin
at every step, in the loss and in every parameter's whole gradient norm.

These are the functions the CLI runs under torchrun (`record_steps` on each side, then `compare`),
without its two torchrun start-ups per layout; tests/e2e/test_check_cli.py runs the command itself,
on a broken layout too. sp2 (Ulysses and ring) and tp2 read partitioned or split gradients (ZeRO-1
over dp x sp, megatron-core's tp shards), dp2 needs a twin reading two data streams, and pp2 reads
its gradients inside DeepSpeed's pipeline engine under the pipeline's parameter names.
"""

from __future__ import annotations

import json

import pytest

from harness import run_ranks

STEPS = 3
LAYOUTS = {  # name: overrides of debug-cpu
    "sp2-ulysses": ("parallel.dp=1", "parallel.sp=2"),
    "sp2-ring": ("parallel.dp=1", "parallel.sp=2", "parallel.sp_method=ring"),
    "tp2": ("parallel.dp=1", "parallel.tp=2"),
    "dp2": ("parallel.dp=2",),
    "pp2": ("parallel.dp=1", "parallel.pp=2"),
}
_twins: dict[str, list] = {}  # resolved twin config -> its records: sp2, tp2 and pp2 share one twin


def _config(data: str, overrides: tuple[str, ...]):
    from ithaca.launcher.config.load import load_config

    return load_config("debug-cpu", [f"data.path={data}", "data.seq_len=64", "train.global_batch=4",
                                     "train.micro_batch=1", "data.workers=1", *overrides])


def _record(data: str, overrides: tuple[str, ...]) -> list:
    from ithaca.launcher.train.check import record_steps

    return record_steps(_config(data, overrides), STEPS)


def _twin(data: str, layout: tuple[str, ...]) -> list:
    from ithaca.launcher.train.check import twin_overrides

    overrides = (*layout, *twin_overrides(_config(data, layout)))
    key = json.dumps(_config(data, overrides).to_dict(), sort_keys=True)
    if key not in _twins:
        (_twins[key],) = run_ranks(_record, 1, data, overrides)
    return _twins[key]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_its_one_process_twin(layout, short_doc_shards):
    from ithaca.launcher.train.check import LAYOUT_OVERRIDES, compare, first_divergence, format_table

    overrides = (*LAYOUTS[layout], *LAYOUT_OVERRIDES)
    cfg = _config(str(short_doc_shards), overrides)
    per_rank = run_ranks(_record, cfg.parallel.world_size, str(short_doc_shards), overrides)
    twin = _twin(str(short_doc_shards), overrides)
    assert all(records == per_rank[0] for records in per_rank)  # every rank reports the same global numbers
    comparisons = compare(per_rank[0], twin)  # raises unless both hold the same parameters
    assert len(comparisons) == STEPS and len(comparisons[0].grad_diffs) == 15  # 2 blocks x 6, embed, norm, head
    assert min(twin[0].grad_norms.values()) > 0  # real gradients, not zeros matching zeros
    assert first_divergence(comparisons) is None, format_table(comparisons)
