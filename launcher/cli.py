"""The `ithaca` command: `prep` writes shards, `train` runs (or starts torchrun for) a config.

Config and usage errors exit 2 with one line on stderr; expected failures (bad data, a missing
checkpoint) exit 1 with one line; anything else exits 1 with its traceback.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import warnings
from pathlib import Path

from ithaca.launcher.config import ConfigError

USAGE_ERROR, FAILURE, INTERRUPTED = 2, 1, 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ithaca", description="Distributed pretraining for long sequences.")
    sub = parser.add_subparsers(dest="command", required=True)

    prep = sub.add_parser("prep", help="tokenize text/JSONL into webdataset shards")
    prep.add_argument("--input", nargs="+", type=Path, metavar="PATH",
                      help="text/JSONL files or folders (.gz too); default: the Python standard library's modules")
    prep.add_argument("--output", required=True, type=Path, help="new folder for the shards and manifest.json")
    prep.add_argument("--tokenizer", default="byte", help="'byte' (default) or the path of a tokenizer.json")
    prep.add_argument("--field", default="text", help="the JSONL field that holds the text (default: text)")
    prep.add_argument("--shard-tokens", type=int, default=1 << 22,
                      help="tokens per shard (default: 4Mi); a run needs at least dp x data.workers shards")
    prep.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                      help="tokenizer processes (default: one per CPU)")

    train = sub.add_parser("train", help="train a model from a YAML config")
    train.add_argument("--config", required=True, help="a YAML path, or a shipped config name (e.g. debug-cpu)")
    train.add_argument("--nproc", type=int, help="processes to start with torchrun (default: dp*tp*pp*sp); "
                                                 "not used when already under torchrun")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override one config value (repeatable), e.g. --set train.steps=20")
    train.add_argument("--resume", nargs="?", const="latest", metavar="CKPT",
                       help="continue from the latest checkpoint, or from the checkpoint folder given; "
                            "'auto': from the latest if there is one, else start (what SLURM jobs use)")
    submit = sub.add_parser("submit", help="submit a training run to SLURM (sbatch)")
    submit.add_argument("--config", required=True, help="a YAML path, or a shipped config name")
    submit.add_argument("--nodes", type=int, required=True)
    submit.add_argument("--gpus-per-node", type=int, required=True, help="0 runs CPU processes (gloo)")
    submit.add_argument("--partition")
    submit.add_argument("--account")
    submit.add_argument("--time", help="time limit, e.g. 04:00:00")
    submit.add_argument("--qos")
    submit.add_argument("--signal-grace", type=int, default=120,
                        help="seconds before the time limit to checkpoint and requeue (default: 120)")
    submit.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value (repeatable)")
    submit.add_argument("--dry-run", action="store_true", help="print the batch script; write and submit nothing")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    try:
        if args.command == "prep":
            return _prep(args)
        if args.command == "submit":
            return _submit(args)
        return _train(args, argv)
    except ConfigError as err:
        print(f"ithaca: config error: {err}", file=sys.stderr)
        return USAGE_ERROR
    except ValueError as err:
        print(f"ithaca: {err}", file=sys.stderr)
        return FAILURE
    except KeyboardInterrupt:
        print("ithaca: interrupted", file=sys.stderr)
        return INTERRUPTED


def _prep(args: argparse.Namespace) -> int:
    from ithaca.data.inputs import default_inputs, expand_inputs
    from ithaca.data.prep import prep
    from ithaca.data.tokenizer import load_tokenizer

    if args.shard_tokens < 1:
        raise ConfigError("--shard-tokens", args.shard_tokens, "use 1 or more")
    if args.workers < 1:
        raise ConfigError("--workers", args.workers, "use 1 or more")
    tokenizer = load_tokenizer(args.tokenizer)
    files = expand_inputs(args.input) if args.input else default_inputs()
    if not files:
        raise ValueError(f"--input: no text files found in {', '.join(map(str, args.input))}")
    manifest = prep(files, args.output, tokenizer, shard_tokens=args.shard_tokens, field=args.field,
                    workers=args.workers, progress=True)
    print(f"wrote {len(manifest.shards)} shards, {manifest.documents} documents, {manifest.tokens} tokens "
          f"to {args.output}")
    return 0


def _train(args: argparse.Namespace, argv: list[str]) -> int:
    _quiet_library_warnings()
    from ithaca.launcher.config_load import load_config
    from ithaca.launcher.distributed import env_world_size, launched_by_torchrun
    from ithaca.launcher.preflight import check_kernels_here, preflight

    cfg = load_config(args.config, args.overrides)
    check_kernels_here(cfg)
    if args.resume == "auto":
        from ithaca.launcher.checkpoint import LATEST

        args.resume = LATEST if (cfg.checkpoint_dir / LATEST).is_file() else None
    if not launched_by_torchrun():
        nproc = args.nproc or cfg.parallel.world_size
        preflight(cfg, nproc, args.resume)
        return _start_torchrun(nproc, argv)
    preflight(cfg, env_world_size(), args.resume)
    from ithaca.launcher.train import run_training

    run_training(cfg, resume=args.resume)
    return 0


def _submit(args: argparse.Namespace) -> int:
    from ithaca.launcher.config_load import load_config, resolve_config_path
    from ithaca.launcher.preflight import preflight
    from ithaca.launcher.submit import SlurmJob, render, submit

    job = SlurmJob(nodes=args.nodes, gpus_per_node=args.gpus_per_node, partition=args.partition,
                   account=args.account, time=args.time, qos=args.qos, signal_grace=args.signal_grace)
    cfg = load_config(args.config, args.overrides)
    script = render(cfg, job, f"ithaca-{resolve_config_path(args.config).stem}")
    preflight(cfg, cfg.parallel.world_size)
    if args.dry_run:
        print(script, end="")
        return 0
    job_id, log_file = submit(cfg, script)
    print(f"submitted job {job_id}; log: {log_file}")
    return 0


def _start_torchrun(nproc: int, argv: list[str]) -> int:
    """Re-run this command under torchrun on this machine (without --nproc)."""
    rest, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == "--nproc":
            skip = True
        elif not item.startswith("--nproc="):
            rest.append(item)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "ithaca", *rest]
    return subprocess.call(cmd, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})


def _quiet_library_warnings() -> None:
    """Hide import-time notices that are not about this run (megatron-core's optional extras)."""
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    warnings.filterwarnings("ignore", category=FutureWarning)
    if "DS_ACCELERATOR" not in os.environ:  # else DeepSpeed warns on every rank while guessing
        import torch

        os.environ["DS_ACCELERATOR"] = "cuda" if torch.cuda.is_available() else "cpu"
