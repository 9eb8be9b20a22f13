"""`ithaca eval`: what eval.metrics selects (held-out loss, loss by position, passkey retrieval) of a
checkpoint (any layout) or a Hugging Face Llama, under the config's layout, on the same eval
batches and prompts as the evals during training.

Without torchrun it checks what it can before any process starts (the config, the checkpoint
folder, the HF folder's shape, the eval data, a new output folder, with --mlflow run the training
run's journal), then runs itself under torchrun on --nproc processes; each rank then evaluates
(launcher/eval/saved.py), and rank 0 prints the eval lines and tables, writes eval.json and the
PNGs into --output and, with --mlflow, logs them to MLflow (launcher/eval/mlflow_report.py).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from ithaca.launcher.config.schema import ConfigError, RunConfig


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("eval", help="evaluate a checkpoint or a Hugging Face Llama on held-out data: "
                                         "eval loss, loss by position and passkey retrieval (eval.metrics)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, metavar="CKPT",
                        help="a step_N checkpoint folder (any layout: it is resharded to the config's), or a "
                             "checkpoints folder (the one `latest` names)")
    source.add_argument("--hf", type=Path, metavar="DIR", help="a Hugging Face Llama folder (config.json, safetensors)")
    parser.add_argument("--output", required=True, type=Path, metavar="DIR",
                        help="a new folder for eval.json and the PNGs (never overwritten)")
    parser.add_argument("--config", help="a YAML path or shipped config name (default with --checkpoint: the run's "
                                         "config.yaml two folders above the checkpoint)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value (repeatable), e.g. --set eval.batches=8")
    parser.add_argument("--mlflow", nargs="?", const="run", choices=["run", "new"],
                        help="log the metrics, eval.json and the PNGs to MLflow: into the checkpoint's training run "
                             "at its step (run, the default), or into a new run (new; the only choice with --hf)")
    parser.add_argument("--nproc", type=int, help="processes to start with torchrun (default: dp*tp*pp*sp); "
                                                  "not used when already under torchrun")


def run(args: argparse.Namespace) -> int:
    from ithaca.launcher.config.load import load_config
    from ithaca.launcher.runtime.distributed import launched_by_torchrun

    checkpoint = None if args.checkpoint is None else _checkpoint_folder(args.checkpoint)
    config = args.config or (None if checkpoint is None else str(checkpoint.parent.parent / "config.yaml"))
    if config is None:
        raise ConfigError("--config", None, "give the config of the model in --hf (its model section, data and eval)")
    overrides = [*args.overrides, *([] if args.hf is None else [f"model.init_from={args.hf}"])]
    cfg = load_config(config, overrides)
    if not launched_by_torchrun():
        nproc = args.nproc or cfg.parallel.world_size
        cfg.check_world(nproc)
        _check_inputs(cfg, args, checkpoint)
        from ithaca.launcher.runtime.local_torchrun import start_torchrun

        return start_torchrun(cfg, nproc, _rank_argv(args, config))
    from ithaca.launcher.eval.saved import evaluate_saved

    source = str(checkpoint) if checkpoint is not None else f"hf:{args.hf}"
    record, totals, passkey, seconds = evaluate_saved(cfg, checkpoint=checkpoint, source=source, output=args.output)
    if int(os.environ["RANK"]) == 0:
        _print_report(record, totals, passkey, seconds, args.output)
        if args.mlflow is not None:
            from ithaca.launcher.eval.mlflow_report import log_eval
            from ithaca.launcher.eval.report import EVAL_JSON, PASSKEY_PLOT, PLOT
            from ithaca.launcher.eval.run import eval_metrics

            metrics = {**({} if totals is None else eval_metrics(totals, cfg.eval.metrics)),
                       **({} if passkey is None else passkey.metrics())}
            files = [args.output / name for name in (EVAL_JSON, PLOT, PASSKEY_PLOT) if (args.output / name).is_file()]
            log_eval(cfg, args.mlflow, step=record["step"] or 0, metrics=metrics, files=files, output=args.output,
                     run_key=record.get("training_run_key"))
    return 0


def _print_report(record: dict, totals, passkey, seconds: float, output: Path) -> None:
    from ithaca.launcher.eval.report import format_passkey_table, format_table

    step = "" if record["step"] is None else f" step={record['step']}"
    if "eval_loss" in record:
        print(f"eval{step} eval_loss={totals.loss:.4f} eval_ppl={totals.ppl:.2f} eval_s={seconds:.2f} "
              f"tokens={totals.tokens}", flush=True)
    if "loss_by_position" in record:
        print(format_table(record), flush=True)
    if passkey is not None:
        print(f"passkey{step} passkey_acc={passkey.mean_accuracy:.4f} (share of keys retrieved, by depth and "
              "prompt length)", flush=True)
        print(format_passkey_table(passkey), flush=True)
    written = ", ".join(p.name for p in sorted(output.iterdir()) if p.suffix in (".json", ".png"))
    print(f"wrote {output}/: {written}", flush=True)


def _checkpoint_folder(path: Path) -> Path:
    """A step folder as given, or the one a checkpoints folder's `latest` names. Raises ValueError."""
    from ithaca.launcher.checkpoint.format import LATEST
    from ithaca.launcher.checkpoint.store import resolve_checkpoint

    try:
        if (path / LATEST).is_file():
            return resolve_checkpoint(path, LATEST)
        return resolve_checkpoint(path.parent, str(path))
    except ValueError:
        raise ValueError(f"--checkpoint={str(path)!r}: not a finished checkpoint folder (step_NNNNNNNN with "
                         "manifest.json) nor a checkpoints folder with `latest`") from None


def _check_inputs(cfg: RunConfig, args: argparse.Namespace, checkpoint: Path | None) -> None:
    """What can be refused before any process starts, each in one line (the checkpoint's files are
    checked against its manifest by the ranks, before anything is loaded)."""
    from ithaca.launcher.config.preflight import check_eval_data

    if args.output.exists():
        raise ValueError(f"--output={str(args.output)!r}: exists; choose a new folder")
    if args.mlflow == "run" and args.hf is not None:
        raise ConfigError("--mlflow", "run", "a Hugging Face model has no training run to log into; use --mlflow new")
    if args.hf is not None:
        from ithaca.models.hf_llama import check_hf_config

        config_file = args.hf / "config.json"
        if not config_file.is_file():
            raise ValueError(f"--hf={str(args.hf)!r}: no config.json there; give a Hugging Face model folder")
        check_hf_config(json.loads(config_file.read_text()), cfg.model, str(config_file))
    check_eval_data(cfg)
    if args.mlflow == "run":
        from ithaca.launcher.eval.mlflow_report import check_training_run_free

        check_training_run_free(cfg)


def _rank_argv(args: argparse.Namespace, config: str) -> list[str]:
    source = ["--checkpoint", str(args.checkpoint)] if args.checkpoint is not None else ["--hf", str(args.hf)]
    return ["eval", *source, "--output", str(args.output), "--config", config,
            *(item for o in args.overrides for item in ("--set", o)),
            *([] if args.mlflow is None else ["--mlflow", args.mlflow])]


