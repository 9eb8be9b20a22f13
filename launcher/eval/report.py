"""What `ithaca eval` hands its user, as eval.metrics selects: eval.json, a table and the
loss-by-position PNG (positions), the passkey table and heatmap PNG (passkey)."""

from __future__ import annotations

import json
from pathlib import Path

from ithaca.launcher.eval.loss import EvalTotals
from ithaca.launcher.eval.passkey_table import PasskeyTable
from ithaca.launcher.eval.plots import plot_loss_by_position, plot_passkey
from ithaca.launcher.eval.positions import bucket_bounds

EVAL_JSON = "eval.json"
PLOT = "loss_by_position.png"
PASSKEY_PLOT = "passkey.png"


def eval_record(totals: EvalTotals | None, *, metrics: tuple[str, ...], source: str, step: int | None,
                folder: Path | str, batches: int, passkey: PasskeyTable | None) -> dict:
    """eval.json's content: what was evaluated, on what, and what `metrics` (eval.metrics) selects of
    the losses (the eval loss; per position bucket) and the passkey table."""
    record: dict = {"source": source, "step": step, "eval_data": str(folder)}
    if totals is not None:
        record.update(seq_len=totals.seq_len, batches=batches, tokens=totals.tokens)
    if totals is not None and "loss" in metrics:
        record.update(eval_loss=totals.loss, eval_ppl=totals.ppl)
    if totals is not None and "positions" in metrics:
        buckets = zip(bucket_bounds(totals.seq_len), totals.bucket_sums, totals.bucket_tokens)
        record["loss_by_position"] = [{"first": lo, "last": hi, "tokens": n, "loss": s / n if n else None}
                                      for (lo, hi), s, n in buckets]
    if passkey is not None:
        record["passkey"] = passkey.record()
    return record


def write_report(record: dict, totals: EvalTotals | None, passkey: PasskeyTable | None, folder: Path) -> list[Path]:
    """eval.json and the PNGs the record calls for into `folder` (which must exist); returns the files written."""
    written = [folder / EVAL_JSON]
    written[0].write_text(json.dumps(record, indent=1) + "\n")
    if totals is not None and "loss_by_position" in record:
        plot_loss_by_position({record["step"] or 0: totals.bucket_losses()}, folder / PLOT)
        written.append(folder / PLOT)
    if passkey is not None:
        plot_passkey(passkey.accuracy, record["step"] or 0, folder / PASSKEY_PLOT)
        written.append(folder / PASSKEY_PLOT)
    return written


def format_table(record: dict) -> str:
    """The loss by position as aligned text rows."""
    rows = [f"{'positions':>13} {'tokens':>9} {'loss':>8}"]
    for bucket in record["loss_by_position"]:
        loss = "-" if bucket["loss"] is None else f"{bucket['loss']:.4f}"
        rows.append(f"{bucket['first']:>6}-{bucket['last']:<6} {bucket['tokens']:>9} {loss:>8}")
    return "\n".join(rows)


def format_passkey_table(passkey: PasskeyTable) -> str:
    """Passkey accuracy as aligned text: one row per key depth, one column per prompt length."""
    depths = sorted({d for _, d in passkey.accuracy})
    rows = [f"{'depth':>6} " + " ".join(f"{n:>7}" for n in passkey.lengths)]
    for d in depths:
        rows.append(f"{d:>5}% " + " ".join(f"{passkey.accuracy[(n, d)]:>7.2f}" for n in passkey.lengths))
    return "\n".join(rows)
