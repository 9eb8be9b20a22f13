"""What `ithaca eval` hands its user: eval.json, the loss-by-position PNG and a table."""

from __future__ import annotations

import json
from pathlib import Path

from ithaca.launcher.eval.loss import EvalTotals
from ithaca.launcher.eval.plots import plot_loss_by_position
from ithaca.launcher.eval.positions import bucket_bounds

EVAL_JSON = "eval.json"
PLOT = "loss_by_position.png"


def eval_record(totals: EvalTotals, *, source: str, step: int | None, folder: Path | str, batches: int) -> dict:
    """eval.json's content: what was evaluated, on what, and its losses (per position bucket too)."""
    buckets = zip(bucket_bounds(totals.seq_len), totals.bucket_sums, totals.bucket_tokens)
    return {"source": source, "step": step, "eval_data": str(folder), "seq_len": totals.seq_len,
            "batches": batches, "tokens": totals.tokens, "eval_loss": totals.loss, "eval_ppl": totals.ppl,
            "loss_by_position": [{"first": lo, "last": hi, "tokens": n, "loss": s / n if n else None}
                                 for (lo, hi), s, n in buckets]}


def write_report(record: dict, totals: EvalTotals, folder: Path) -> None:
    """eval.json and the PNG into `folder` (which must exist)."""
    (folder / EVAL_JSON).write_text(json.dumps(record, indent=1) + "\n")
    plot_loss_by_position({record["step"] or 0: totals.bucket_losses()}, folder / PLOT)


def format_table(record: dict) -> str:
    """The loss by position as aligned text rows."""
    rows = [f"{'positions':>13} {'tokens':>9} {'loss':>8}"]
    for bucket in record["loss_by_position"]:
        loss = "-" if bucket["loss"] is None else f"{bucket['loss']:.4f}"
        rows.append(f"{bucket['first']:>6}-{bucket['last']:<6} {bucket['tokens']:>9} {loss:>8}")
    return "\n".join(rows)

