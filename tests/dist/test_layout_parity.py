"""The debug model trained 10 steps gives the same loss curve under every layout.

Same seed and same global batches in every layout; weights are drawn whole and then split, so
1 process, dp2, sp2 (Ulysses), tp2, dp2 x sp2 and tp2 x sp2 train the same function. With 4 heads
and 2 kv heads, tp2 x sp2 leaves one kv head per tp rank and repeats it over the sp ranks.
"""

from __future__ import annotations

import pytest
import torch

from harness import run_ranks

STEPS = 10
LAYOUTS = {  # name: (dp, tp, sp)
    "dp2": (2, 1, 1), "sp2": (1, 1, 2), "tp2": (1, 2, 1), "dp2xsp2": (2, 1, 2), "tp2xsp2": (1, 2, 2),
}


def _train_losses(data: str, out: str, dp: int, tp: int, sp: int) -> list[float]:
    from ithaca.launcher.config_load import load_config
    from ithaca.launcher.train import run_training

    cfg = load_config("debug-cpu", [
        f"data.path={data}", "data.seq_len=64", f"train.output_dir={out}", f"train.steps={STEPS}",
        "train.global_batch=4", "train.micro_batch=1", "train.log_every=100", "checkpoint.every=1000",
        f"parallel.dp={dp}", f"parallel.tp={tp}", f"parallel.sp={sp}"])
    return [r.loss for r in run_training(cfg)]


@pytest.fixture(scope="module")
def single_process_losses(debug_shards, tmp_path_factory) -> list[float]:
    (losses,) = run_ranks(_train_losses, 1, str(debug_shards), str(tmp_path_factory.mktemp("single")), 1, 1, 1)
    return losses


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_gives_single_process_loss_curve(layout, single_process_losses, debug_shards, tmp_path):
    dp, tp, sp = LAYOUTS[layout]
    per_rank = run_ranks(_train_losses, dp * tp * sp, str(debug_shards), str(tmp_path), dp, tp, sp)
    assert len(single_process_losses) == STEPS
    assert single_process_losses[-1] < single_process_losses[0] - 0.5  # it trains, so the curve means something
    # fp32: layouts differ only in reduction order (all-reduce sums, split matmuls); over 10
    # AdamW steps that drifts to ~1e-6 relative; 1e-4 still catches a wrong scale or slice
    # (a missing /dp or a lost label moves the loss by >1e-2 from the first step).
    torch.testing.assert_close(per_rank[0], single_process_losses, rtol=1e-4, atol=0)
    assert all(losses == per_rank[0] for losses in per_rank)  # every rank logs the same global loss
