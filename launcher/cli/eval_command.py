"""`ithaca eval`: held-out loss and loss by position of a checkpoint (any layout) or a Hugging Face
Llama, under the config's layout, on the same eval batches as the evals during training.

Without torchrun it checks what it can before any process starts (the config, the checkpoint
folder, the HF folder's shape, the eval data, a new output folder), then runs itself under
torchrun on --nproc processes; each rank then evaluates (launcher/eval/saved.py), and rank 0
prints the eval line and the table and writes eval.json and the PNG into --output.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from ithaca.launcher.config.schema import ConfigError, RunConfig


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("eval", help="evaluate a checkpoint or a Hugging Face Llama on held-out data: "
                                         "eval loss, loss by position and (eval.passkey) passkey retrieval")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, metavar="CKPT",
                        help="a step_N checkpoint folder (any layout: it is resharded to the config's), or a "
                             "checkpoints folder (the one `latest` names)")
    source.add_argument("--hf", type=Path, metavar="DIR", help="a Hugging Face Llama folder (config.json, safetensors)")
    parser.add_argument("--output", required=True, type=Path, metavar="DIR",
                        help="a new folder for eval.json and loss_by_position.png (never overwritten)")
    parser.add_argument("--config", help="a YAML path or shipped config name (default with --checkpoint: the run's "
                                         "config.yaml two folders above the checkpoint)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value (repeatable), e.g. --set eval.batches=8")
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
    from ithaca.launcher.eval.report import format_passkey_table, format_table
    from ithaca.launcher.eval.saved import evaluate_saved

    source = str(checkpoint) if checkpoint is not None else f"hf:{args.hf}"
    record, totals, passkey, seconds = evaluate_saved(cfg, checkpoint=checkpoint, source=source, output=args.output)
    if int(os.environ["RANK"]) == 0:
        step = "" if record["step"] is None else f" step={record['step']}"
        print(f"eval{step} eval_loss={totals.loss:.4f} eval_ppl={totals.ppl:.2f} eval_s={seconds:.2f} "
              f"tokens={totals.tokens}", flush=True)
        print(format_table(record), flush=True)
        if passkey is not None:
            print(f"passkey passkey_acc={passkey.mean_accuracy:.4f} (share of keys retrieved, by depth and "
                  "prompt length)", flush=True)
            print(format_passkey_table(passkey), flush=True)
        plots = "loss_by_position.png" + ("" if passkey is None else " and passkey.png")
        print(f"wrote {args.output}/eval.json, {plots}", flush=True)
    return 0


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
    from ithaca.data.shards import read_manifest
    from ithaca.launcher.eval.batches import eval_folder, eval_windows

    if args.output.exists():
        raise ValueError(f"--output={str(args.output)!r}: exists; choose a new folder")
    if args.hf is not None:
        from ithaca.models.hf_llama import check_hf_config

        config_file = args.hf / "config.json"
        if not config_file.is_file():
            raise ValueError(f"--hf={str(args.hf)!r}: no config.json there; give a Hugging Face model folder")
        check_hf_config(json.loads(config_file.read_text()), cfg.model, str(config_file))
    folder = eval_folder(cfg)
    eval_windows(folder, read_manifest(folder), cfg.eval_seq_len, cfg.eval.batches * cfg.train.global_batch)
    if cfg.eval.passkey:
        from ithaca.launcher.eval.passkey import run_prompts

        run_prompts(cfg)


def _rank_argv(args: argparse.Namespace, config: str) -> list[str]:
    source = ["--checkpoint", str(args.checkpoint)] if args.checkpoint is not None else ["--hf", str(args.hf)]
    return ["eval", *source, "--output", str(args.output), "--config", config,
            *(item for o in args.overrides for item in ("--set", o))]


