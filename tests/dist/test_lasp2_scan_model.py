"""The debug linear model at sp2 with its states scanned point to point trains the 1-process curve.

The unit twin (test_lasp2.py) checks one layer; this checks the config field reaches every layer
through parallelize_llama and the scan's messages pair up across layers, steps and backward passes.
Runs and tolerances as in test_layout_parity.py, whose helpers this reuses.
"""

from __future__ import annotations

import torch

from harness import run_ranks
from test_layout_parity import _single_process, _train_curves


def test_debug_linear_model_with_the_scan_gives_the_single_process_curve(short_doc_shards, tmp_path_factory):
    single = _single_process(str(short_doc_shards), (), "debug-linear-cpu")  # sp=1: no exchange at all
    per_rank = run_ranks(_train_curves, 2, str(short_doc_shards), str(tmp_path_factory.mktemp("scan")),
                         1, 1, 2, ("model.linear_sp_exchange=scan",), "debug-linear-cpu")
    assert single["loss"][-1] < single["loss"][0] - 0.3  # it trains, so the curve means something
    # fp32, reduction order only (see test_layout_parity.py for the grad-norm tolerance's reason)
    for curve, rtol in (("loss", 1e-4), ("grad_norm", 1e-3)):
        torch.testing.assert_close(per_rank[0][curve], single[curve], rtol=rtol, atol=0,
                                   msg=lambda m: f"{curve} under sp2 scan: {m}")
