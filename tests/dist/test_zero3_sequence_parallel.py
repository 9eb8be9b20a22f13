"""ZeRO-3 under sequence parallelism trains the debug model along the single-process curves.

DeepSpeed 0.19.8 alone partitions ZeRO-3 parameters over dp (not dp x sp) and reduce-scatters
their gradients there, so sp ranks never add their halves of a sample's gradient; parallel/zero3.py
moves the partitions to dp x sp and picks the reduction that divides by dp. The loss curve checks
the summed gradients (a missing sp sum makes sp ranks' weights drift apart), the pre-clip gradient
norm the divisor and that each sp rank's shard is counted once (a factor sqrt(2) or 2 otherwise).
"""

from __future__ import annotations

import pytest
import torch

from harness import run_ranks
from test_layout_parity import _model_overrides, _single_process, _train_curves

LAYOUTS = {  # name: (dp, tp, sp, extra overrides)
    "sp2-zero3": (1, 1, 2, ("train.zero_stage=3",)),
    "dp2xsp2-ring-zero3": (2, 1, 2, ("train.zero_stage=3", "parallel.sp_method=ring")),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_zero3_with_sequence_parallelism_gives_the_single_process_curves(layout, short_doc_shards,
                                                                          tmp_path_factory):
    dp, tp, sp, extra = LAYOUTS[layout]
    single = _single_process(str(short_doc_shards), _model_overrides(extra), streams=dp)
    per_rank = run_ranks(_train_curves, dp * tp * sp, str(short_doc_shards), str(tmp_path_factory.mktemp(layout)),
                         dp, tp, sp, extra)
    assert single["loss"][-1] < single["loss"][0] - 0.5  # it trains, so the curve means something
    # fp32, as in test_layout_parity: reduction order alone drifts ~1e-6 relative over 10 AdamW
    # steps; a gradient missing its sp half, or divided by dp*sp, moves the grad norm by 40-100%.
    for curve in ("loss", "grad_norm"):
        torch.testing.assert_close(per_rank[0][curve], single[curve], rtol=1e-4, atol=0,
                                   msg=lambda m: f"{curve} under {layout}: {m}")
    assert all(curves == per_rank[0] for curves in per_rank)  # every rank logs the same global numbers

