"""`ithaca eval` on each rank: a saved model (a checkpoint of any layout, resharded as a resume
reshards it, or a Hugging Face Llama through model.init_from) evaluated on the eval batches under
the config's layout, with the same code as the evals during training (launcher/eval/run.py).

Rank 0 writes into `.<output>.partial` (the resolved config, eval.json, the PNGs) and renames it to
`output` only at the end, so a refused checkpoint or a failed eval leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from pathlib import Path


from ithaca.launcher.checkpoint.store import load_checkpoint
from ithaca.launcher.config.schema import RunConfig
from ithaca.launcher.eval.loss import EvalTotals
from ithaca.launcher.eval.passkey_table import PasskeyTable
from ithaca.launcher.eval.report import eval_record, write_report
from ithaca.launcher.eval.run import TrainingEval
from ithaca.launcher.train.loop import set_up


def evaluate_saved(cfg: RunConfig, *, checkpoint: Path | None, source: str,
                   output: Path) -> tuple[dict, EvalTotals | None, PasskeyTable | None, float]:
    """Evaluate the checkpoint folder `checkpoint` (None: the weights `cfg.model.init_from` names)
    in an initialized torchrun environment, on what eval.metrics selects. Returns (eval.json's
    record, the totals or None without loss and positions, the passkey table or None without
    passkey, seconds the eval windows took) on every rank. Raises ValueError for a checkpoint that
    fails its manifest or is of another model shape, and for eval data too short for the eval batches."""
    staging = output.with_name(f".{output.name}.partial")
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, output_dir=str(staging)))
    rank = int(os.environ.get("RANK", "0"))  # the process group starts inside set_up
    try:
        run = set_up(cfg, None if checkpoint is None else str(checkpoint))
        step = None
        if checkpoint is not None:
            _, client = load_checkpoint(run.engine, cfg.checkpoint_dir, str(checkpoint), cfg=cfg, mesh=run.mesh)
            step = client["step"]
        evaluator = TrainingEval(cfg, run.engine, run.mesh, run.device, staging, rank)
        start = time.perf_counter()
        totals = evaluator.run()
        seconds = time.perf_counter() - start
        passkey = evaluator.run_passkey()
        record = eval_record(totals, metrics=cfg.eval.metrics, source=source, step=step, folder=evaluator.folder,
                             batches=cfg.eval.batches, passkey=passkey)
        if checkpoint is not None:  # the MLflow run of the training run that saved it (tracking/tracker.py)
            record["training_run_key"] = client.get("tracking_run_key")
        if rank == 0:
            write_report(record, totals, passkey, staging)
            staging.rename(output)
    except BaseException:
        if rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    return record, totals, passkey, seconds
