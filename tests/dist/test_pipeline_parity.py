"""Pipeline parallelism, alone and beside dp, tp and sp, trains the single-process loss curve.

Each stage builds only its own blocks, yet from the same per-part seeds as the whole model, so
every layout below trains the same function on the same batches as one process (see
test_layout_parity.py for the data and the tolerances). The Llama and the hybrid debug models
(LASP-2 inside the stages under sp) both run; activation checkpointing rides along on some cells,
and full/selective recomputation is exact, so those cells use the same single-process curve.
"""

from __future__ import annotations

import pytest
import torch

from harness import run_ranks
from test_layout_parity import _model_overrides, _single_process, _train_curves

LLAMA, HYBRID = "debug-cpu", "debug-hybrid-cpu"
LAYOUTS = {  # name: (config, dp, pp, tp, sp, extra overrides)
    "llama-pp2": (LLAMA, 1, 2, 1, 1, ()),
    "hybrid-pp2": (HYBRID, 1, 2, 1, 1, ()),
    "llama-pp2-full-recompute": (LLAMA, 1, 2, 1, 1, ("model.activation_checkpointing=full",)),
    "hybrid-pp2-selective-recompute": (HYBRID, 1, 2, 1, 1, ("model.activation_checkpointing=selective",)),
    "llama-pp2xsp2-ulysses": (LLAMA, 1, 2, 1, 2, ("parallel.sp_method=ulysses",)),
    "hybrid-pp2xsp2-ring": (HYBRID, 1, 2, 1, 2, ("parallel.sp_method=ring",
                                                 "model.activation_checkpointing=selective")),
    "llama-pp2xsp2-ring": (LLAMA, 1, 2, 1, 2, ("parallel.sp_method=ring", "model.activation_checkpointing=full")),
    "hybrid-pp2xsp2-ulysses": (HYBRID, 1, 2, 1, 2, ("parallel.sp_method=ulysses",)),
    # no document ids or resets to carry between the stages
    "llama-pp2xtp2-no-document-mask": (LLAMA, 1, 2, 2, 1, ("data.document_mask=false",)),
    "hybrid-pp2xtp2": (HYBRID, 1, 2, 2, 1, ()),
    "llama-dp2xpp2": (LLAMA, 2, 2, 1, 1, ()),
    "hybrid-dp2xpp2": (HYBRID, 2, 2, 1, 1, ()),
    # four stages of one block each, and an uneven explicit split of the same 4-layer model; its
    # embedding is tied to the output head, a weight DeepSpeed keeps in step on the first and last stage
    "llama-pp4-tied": (LLAMA, 1, 4, 1, 1, ("model.n_layers=4", "model.tie_embeddings=true")),
    "llama-pp2-split-1-3-tied": (LLAMA, 1, 2, 1, 1, ("model.n_layers=4", "model.tie_embeddings=true",
                                                     "parallel.pp_split=[1,3]")),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_pipeline_layout_gives_single_process_curve(layout, short_doc_shards, tmp_path_factory):
    config, dp, pp, tp, sp, extra = LAYOUTS[layout]
    single = _single_process(str(short_doc_shards), _model_overrides(extra), config, streams=dp)
    per_rank = run_ranks(_train_curves, dp * pp * tp * sp, str(short_doc_shards),
                         str(tmp_path_factory.mktemp(layout)), dp, tp, sp, (f"parallel.pp={pp}", *extra), config)
    assert single["loss"][-1] < single["loss"][0] - 0.3  # it trains
    # as in test_layout_parity: loss to 1e-4; grad norm to 1e-3 where linear layers' AdamW drift shows
    for curve, rtol in (("loss", 1e-4), ("grad_norm", 1e-3 if config == HYBRID else 1e-4)):
        torch.testing.assert_close(per_rank[0][curve], single[curve], rtol=rtol, atol=0,
                                   msg=lambda m: f"{curve} under {layout}: {m}")
    assert all(curves == per_rank[0] for curves in per_rank)  # every stage logs the same global numbers


def _losses(data: str, out: str, resume: str | None) -> list[float]:
    from ithaca.launcher.config.load import load_config
    from ithaca.launcher.train.loop import run_training

    cfg = load_config(LLAMA, [f"data.path={data}", "data.seq_len=64", f"train.output_dir={out}", "train.steps=6",
                              "train.global_batch=4", "train.micro_batch=1", "checkpoint.every=3", "parallel.dp=1",
                              "parallel.pp=2", "train.precision=bf16", "data.workers=1"])
    return [r.loss for r in run_training(cfg, resume=resume)]


def test_a_resumed_pipeline_run_continues_the_uninterrupted_curve(short_doc_shards, tmp_path):
    """bf16 (DeepSpeed's BF16 optimizer under the pipeline engine): its fp32 master weights and
    both stages' layer files come back from the checkpoint."""
    full, _ = run_ranks(_losses, 2, str(short_doc_shards), str(tmp_path), None)
    resumed, _ = run_ranks(_losses, 2, str(short_doc_shards), str(tmp_path), str(tmp_path / "checkpoints/step_00000003"))
    assert resumed == full[3:]  # bitwise: the same arithmetic from the same state
