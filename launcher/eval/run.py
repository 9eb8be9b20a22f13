"""Eval during training: every `eval.every` steps and at the last one, what eval.metrics selects,
on the same eval batches (launcher/eval/batches.py) under the training layout (launcher/eval/loss.py).

Rank 0 logs `eval step=N eval_loss=... eval_ppl=... eval_s=...` (loss), sends eval_loss and
eval_ppl (loss) and eval_loss_pos_<first>_<last> (positions) to MLflow at that step, appends the
eval to <train.output_dir>/eval/history.jsonl and, with positions, redraws
<train.output_dir>/eval/loss_by_position.png from that whole file (a resumed run keeps the earlier
evals in the picture; a step evaluated again after a resume replaces its line). With passkey it
scores passkey retrieval (launcher/eval/passkey.py), logs `passkey step=N passkey_acc=...` (the
mean over cells), sends passkey_acc_<length>_<depth> and passkey_ll_<length>_<depth> to MLflow,
adds the table to the history line and draws <train.output_dir>/eval/passkey.png for that step.
Each PNG, once drawn, goes to the MLflow run as the artifact of the same name under eval/.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import deepspeed
import torch

from ithaca.launcher.config.schema import RunConfig
from ithaca.launcher.eval.batches import eval_folder, run_batches, say_eval_folder, scores_windows
from ithaca.launcher.eval.loss import EvalTotals, evaluate
from ithaca.launcher.eval.passkey import evaluate_passkey
from ithaca.launcher.eval.passkey_prompts import run_prompts
from ithaca.launcher.eval.passkey_table import PasskeyTable
from ithaca.launcher.eval.plots import plot_loss_by_position, plot_passkey
from ithaca.launcher.eval.positions import metric_names
from ithaca.launcher.eval.report import PASSKEY_PLOT, PLOT
from ithaca.launcher.tracking.tracker import Tracker
from ithaca.log import get_logger
from ithaca.parallel.mesh import ParallelMesh

log = get_logger(__name__)


def eval_metrics(totals: EvalTotals, metrics: tuple[str, ...]) -> dict[str, float]:
    """eval_loss and eval_ppl (loss), and one eval_loss_pos_<first>_<last> per bucket holding tokens
    (positions), as `metrics` (eval.metrics) selects."""
    by_position = dict(zip(metric_names(totals.seq_len),
                           [s / n if n else None for s, n in zip(totals.bucket_sums, totals.bucket_tokens)]))
    return {**({"eval_loss": totals.loss, "eval_ppl": totals.ppl} if "loss" in metrics else {}),
            **({name: loss for name, loss in by_position.items() if loss is not None}
               if "positions" in metrics else {})}


def read_history(path: Path) -> dict[int, dict[tuple[int, int], float]]:
    """history.jsonl -> eval step -> (first, last) position -> mean loss; a later line for a step wins
    (lines without the loss by position, from evals without positions, are passed over)."""
    history = {}
    for line in path.read_text().splitlines():
        entry = json.loads(line)
        if "loss_by_position" in entry:
            history[entry["step"]] = {tuple(b): loss for b, loss in entry["loss_by_position"]}
    return history


class TrainingEval:
    """The eval hook of the training loop (launcher/train/loop.py)."""

    def __init__(self, cfg: RunConfig, engine: deepspeed.DeepSpeedEngine, mesh: ParallelMesh, device: torch.device,
                 output: Path, rank: int):
        self.cfg, self.engine, self.mesh, self.device, self.rank = cfg, engine, mesh, device, rank
        self.metrics = cfg.eval.metrics
        self.folder = eval_folder(cfg)
        say_eval_folder(cfg, self.folder)
        self.batches = run_batches(cfg, self.folder, mesh.dp, mesh.rank("dp")) if scores_windows(cfg) else None
        self.prompts = run_prompts(cfg, self.folder) if "passkey" in self.metrics else None
        self.history_path = output / "eval" / "history.jsonl"
        self.plot_path = output / "eval" / PLOT
        self.passkey_plot_path = output / "eval" / PASSKEY_PLOT

    def is_due(self, step: int) -> bool:
        return step % self.cfg.eval.every == 0 or step == self.cfg.train.steps

    def run(self) -> EvalTotals | None:
        """One eval of the eval windows now (collective): the totals every rank agrees on; None when
        eval.metrics has neither loss nor positions."""
        if self.batches is None:
            return None
        return evaluate(self.engine, self.batches, self.mesh, self.device, self.cfg.eval_seq_len)

    def run_passkey(self) -> PasskeyTable | None:
        """The passkey table now (collective), or None without passkey in eval.metrics."""
        if self.prompts is None:
            return None
        return evaluate_passkey(self.engine, self.cfg, self.prompts, self.mesh, self.device)

    def after_step(self, step: int, tracker: Tracker | None) -> None:
        """The eval when one is due at `step` (collective), logged and tracked on rank 0."""
        if not self.is_due(step):
            return
        start = time.perf_counter()
        totals = self.run()
        seconds = time.perf_counter() - start
        if totals is not None and "loss" in self.metrics:
            log.info(f"eval step={step} eval_loss={totals.loss:.4f} eval_ppl={totals.ppl:.2f} eval_s={seconds:.2f}")
        passkey = self.run_passkey()
        if passkey is not None:
            log.info(f"passkey step={step} passkey_acc={passkey.mean_accuracy:.4f}")
        if self.rank == 0:
            plots = self._record(step, totals, passkey)
            if tracker:
                values = {} if totals is None else {**eval_metrics(totals, self.metrics), "eval_s": seconds}
                tracker.log_step(step, {**values, **({} if passkey is None else passkey.metrics())})
                for plot in plots:
                    tracker.log_file(f"eval/{plot.name}", plot)

    def _record(self, step: int, totals: EvalTotals | None, passkey: PasskeyTable | None) -> list[Path]:
        """The history line and the plots; returns the plots drawn."""
        self.history_path.parent.mkdir(parents=True, exist_ok=True)
        entry: dict = {"step": step}
        plots = []
        if totals is not None and "loss" in self.metrics:
            entry.update(eval_loss=totals.loss, tokens=totals.tokens)
        if totals is not None and "positions" in self.metrics:
            entry["loss_by_position"] = [[list(b), loss] for b, loss in totals.bucket_losses().items()]
        if passkey is not None:
            entry["passkey"] = passkey.record()
            plot_passkey(passkey.accuracy, step, self.passkey_plot_path)
            plots.append(self.passkey_plot_path)
        with self.history_path.open("a") as f:
            f.write(json.dumps(entry) + "\n")
        if "loss_by_position" in entry:
            plot_loss_by_position(read_history(self.history_path), self.plot_path)
            plots.append(self.plot_path)
        return plots
