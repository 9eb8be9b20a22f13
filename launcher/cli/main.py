"""The `ithaca` command: `prep` writes shards, `train` runs (or starts torchrun for) a config.

Config and usage errors exit 2 with one line on stderr; expected failures (bad data, a missing
checkpoint) exit 1 with one line; anything else exits 1 with its traceback.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import warnings
from pathlib import Path

from ithaca.launcher.config.schema import ConfigError, RunConfig
from ithaca.launcher.runtime.process_lifetime import die_with_parent

USAGE_ERROR, FAILURE, INTERRUPTED = 2, 1, 130
LAUNCHER_OPTIONS = ("--nproc", "--max-restarts")
"""Options of `ithaca train` that the launcher uses and does not pass on to the ranks."""


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
    prep.add_argument("--on-error", choices=["stop", "skip"], default="stop",
                      help="a file or JSONL line that is not readable text (corrupt .gz, binary, not UTF-8, "
                           "not JSON, no --field): 'stop' (default) ends the prep naming it; 'skip' leaves it "
                           "out and counts it in manifest.json")
    prep.add_argument("--holdout", type=float, metavar="N",
                      help="set documents aside for evaluation in OUTPUT/holdout/ (never in a training shard): "
                           "N >= 1 the first N documents, 0 < N < 1 an evenly spread fraction of them")

    train = sub.add_parser("train", help="train a model from a YAML config")
    train.add_argument("--config", required=True, help="a YAML path, or a shipped config name (e.g. debug-cpu)")
    train.add_argument("--nproc", type=int, help="processes to start with torchrun (default: dp*tp*pp*sp); "
                                                 "not used when already under torchrun")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override one config value (repeatable), e.g. --set train.steps=20")
    train.add_argument("--max-restarts", type=int, default=0, metavar="K",
                       help="when a rank fails, restart every rank from the latest complete checkpoint, up "
                            "to K times (torchrun's elastic restarts; default 0)")
    train.add_argument("--resume", nargs="?", const="latest", metavar="CKPT",
                       help="continue from the latest checkpoint, or from the checkpoint folder given; "
                            "'auto': from the latest if there is one, else start (what SLURM jobs use)")
    train.add_argument("--check-first", action="store_true",
                       help="run `ithaca check` on this config first (from its seed, whatever --resume says) "
                            "and train only if it passes")
    train.add_argument("--force", action="store_true",
                       help="start even when the plan predicts a peak above each rank's memory")
    from ithaca.launcher.train.check import DEFAULT_STEPS  # light: the check's heavy imports are inside its functions

    check = sub.add_parser("check", help="train a few steps of the config's layout and of one process with the "
                                         "same weights and batches (fp32); compare losses and gradient norms")
    check.add_argument("--config", required=True, help="a YAML path, or a shipped config name (e.g. debug-cpu)")
    check.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override one config value (repeatable), e.g. --set parallel.sp=2")
    check.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"steps to compare (default: {DEFAULT_STEPS})")
    check.add_argument("--nproc", type=int, help="processes for the layout's run (default: dp*tp*pp*sp)")
    # Not for users: `ithaca check` runs itself under torchrun with it, once per side, to record the steps.
    check.add_argument("--record", type=Path, help=argparse.SUPPRESS)
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
    submit.add_argument("--max-restarts", type=int, default=0, metavar="K",
                        help="when a rank fails, restart every rank from the latest complete checkpoint, up "
                             "to K times within the job (default 0)")
    submit.add_argument("--min-nodes", type=int, metavar="M",
                        help="elastic: start on M to --nodes nodes and go on without a node that fails, on a "
                             "layout fitted to the nodes left (needs --max-restarts 1 or more)")
    submit.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value (repeatable)")
    submit.add_argument("--dry-run", action="store_true", help="print the batch script; write and submit nothing")
    submit.add_argument("--device", metavar="NAME|FILE",
                        help="the nodes' GPU for the memory check (`ithaca plan --device`; default h100, or with "
                             "--gpus-per-node 0 this machine's CPU row)")
    submit.add_argument("--force", action="store_true",
                        help="submit even when the plan predicts a peak above each rank's memory")
    from ithaca.launcher.cli import eval_command, plan_command  # light: heavy imports are inside their run()

    eval_command.add_parser(sub)
    plan_command.add_parser(sub)
    track_sync = sub.add_parser("track-sync", help="push the MLflow records a run journaled while its tracking "
                                                   "server did not answer")
    track_sync.add_argument("dir", type=Path, metavar="DIR", help="the run's output folder (train.output_dir)")
    track_sync.add_argument("--uri", help="push to this tracking URI instead of the run's tracking.uri (each URI "
                                          "keeps its own progress)")
    export = sub.add_parser("export", help="write a checkpoint (any layout) as a Hugging Face Llama folder, or in "
                                           "Ithaca's format for linear and hybrid models")
    export.add_argument("--checkpoint", required=True, type=Path, metavar="CKPT",
                        help="a step_N checkpoint folder, or a checkpoints folder (exports the one `latest` names)")
    export.add_argument("--output", required=True, type=Path, metavar="DIR", help="a new folder (never overwritten)")
    export.add_argument("--dtype", choices=["bf16", "fp32"], default="fp32", help="weights' dtype (default: fp32)")
    export.add_argument("--config", type=Path, help="the run's YAML (default: config.yaml two folders above the "
                                                    "checkpoint, where training writes it)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    try:
        if args.command == "prep":
            return _prep(args)
        if args.command == "submit":
            return _submit(args)
        if args.command == "track-sync":
            return _track_sync(args)
        if args.command == "check":
            return _check(args)
        if args.command == "export":
            return _export(args)
        if args.command == "eval":
            from ithaca.launcher.cli import eval_command

            return eval_command.run(args)
        if args.command == "plan":
            from ithaca.launcher.cli import plan_command

            return plan_command.run(args)
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
    from ithaca.data.input_errors import read_skip_log
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
                    workers=args.workers, progress=True, on_error=args.on_error,
                    holdout=args.holdout)
    skipped = f"; {read_skip_log(args.output).summary()}" if args.on_error == "skip" else ""
    held = "" if manifest.holdout is None else \
        f"; {manifest.holdout['documents']} documents held out in {args.output / manifest.holdout['path']}"
    print(f"wrote {len(manifest.shards)} shards, {manifest.documents} documents, {manifest.tokens} tokens "
          f"to {args.output}{held}{skipped}")
    return 0


def _train(args: argparse.Namespace, argv: list[str]) -> int:
    _quiet_library_warnings()
    from ithaca.launcher.config.load import load_config
    from ithaca.launcher.runtime.distributed import env_world_size, launched_by_torchrun, restart_attempt
    from ithaca.launcher.config.preflight import check_kernels_here, check_memory, preflight

    if args.max_restarts < 0:
        raise ConfigError("--max-restarts", args.max_restarts, "use 0 (no restarts) or more")
    cfg = load_config(args.config, args.overrides)
    check_kernels_here(cfg)
    from ithaca.launcher.runtime.network_interface import use_configured_interface

    use_configured_interface(cfg.train.network_interface)  # here (exit 2 before any process starts) and in each rank
    from ithaca.launcher.checkpoint.format import LATEST

    has_checkpoint = (cfg.checkpoint_dir / LATEST).is_file()
    if args.resume == "auto":
        args.resume = LATEST if has_checkpoint else None
    if not launched_by_torchrun():
        nproc = args.nproc or cfg.parallel.world_size
        preflight(cfg, nproc, args.resume)
        if not args.force:
            check_memory(cfg, nproc)
        if args.check_first:
            from ithaca.launcher.train.check import DEFAULT_STEPS

            failure = _run_check(cfg, args.config, args.overrides, nproc, DEFAULT_STEPS)
            if failure is not None:
                print(f"ithaca: check failed, not training: {failure}", file=sys.stderr)
                return FAILURE
        argv = [item for item in argv if item != "--check-first"]  # checked here; the ranks only train
        return _start_torchrun(cfg, nproc, args.max_restarts, argv)
    if args.check_first:
        raise ConfigError("--check-first", True, "the check starts its own processes, so it cannot run under "
                                                 "torchrun; give it to `ithaca train` without torchrun, or run "
                                                 "`ithaca check` before starting torchrun")
    # torchrun killed outright: its ranks checkpoint and stop instead of training on (SIGTERM is a stop signal)
    die_with_parent(signal.SIGTERM)
    restart = restart_attempt()
    if restart and has_checkpoint:  # torchrun restarted every rank after one failed (--max-restarts)
        args.resume = LATEST
        print(f"ithaca: restart {restart}: resuming from the latest complete checkpoint", file=sys.stderr)
    from ithaca.launcher.runtime.elastic import layout_for_this_attempt

    if args.resume == LATEST:  # the checkpoint the line names as resharded
        resumed = cfg.checkpoint_dir / (cfg.checkpoint_dir / LATEST).read_text().strip() if has_checkpoint else None
    else:
        resumed = None if args.resume is None else Path(args.resume)
    cfg, change = layout_for_this_attempt(cfg, resumed)
    if change and os.environ.get("RANK") == "0":
        print(f"ithaca: {change}", file=sys.stderr)
    preflight(cfg, env_world_size(), args.resume)
    from ithaca.launcher.train.loop import run_training

    run_training(cfg, resume=args.resume)
    return 0


def _check(args: argparse.Namespace) -> int:
    _quiet_library_warnings()
    from ithaca.launcher.config.load import load_config
    from ithaca.launcher.runtime.distributed import env_world_size, launched_by_torchrun

    if args.steps < 1:
        raise ConfigError("--steps", args.steps, "use 1 or more")
    cfg = load_config(args.config, args.overrides)
    if not launched_by_torchrun():
        failure = _run_check(cfg, args.config, args.overrides, args.nproc, args.steps)
        if failure is not None:
            print(f"ithaca: check failed: {failure}", file=sys.stderr)
            return FAILURE
        return 0
    if args.record is None:
        raise ConfigError("ithaca check", "under torchrun", "run it without torchrun: it starts the layout's "
                                                            "processes and the one-process twin itself")
    from ithaca.launcher.train.check import record_to
    from ithaca.launcher.config.preflight import preflight

    preflight(cfg, env_world_size())
    record_to(args.record, cfg, args.steps)
    return 0


def _run_check(cfg: RunConfig, config: str, overrides: list[str], nproc: int | None, steps: int) -> str | None:
    """Check `cfg` (the config `config` with `overrides`) and print its table; returns the failure
    line, or None if the layout matches one process."""
    from ithaca.launcher.train.check import run_check

    result = run_check(config, overrides, steps, nproc, lambda n, argv: _start_torchrun(cfg, n, 0, argv))
    print(result.report(), flush=True)
    return result.failure


def _submit(args: argparse.Namespace) -> int:
    from ithaca.launcher.config.load import load_config, resolve_config_path
    from ithaca.launcher.config.preflight import check_memory, preflight
    from ithaca.launcher.cli.submit import SlurmJob, render, submit

    job = SlurmJob(nodes=args.nodes, gpus_per_node=args.gpus_per_node, partition=args.partition,
                   account=args.account, time=args.time, qos=args.qos, signal_grace=args.signal_grace,
                   max_restarts=args.max_restarts, min_nodes=args.min_nodes)
    cfg = load_config(args.config, args.overrides)
    script = render(cfg, job, f"ithaca-{resolve_config_path(args.config).stem}")
    preflight(cfg, cfg.parallel.world_size)
    if not args.force:
        world = cfg.parallel.world_size
        check_memory(cfg, world, gpus_per_node=args.gpus_per_node or -(-world // args.nodes),
                     device_name=args.device or ("h100" if args.gpus_per_node else "cpu"))
    if args.dry_run:
        print(script, end="")
        return 0
    job_id, log_file = submit(cfg, script)
    print(f"submitted job {job_id}; log: {log_file}")
    return 0


def _export(args: argparse.Namespace) -> int:
    _quiet_library_warnings()
    import torch

    from ithaca.launcher.checkpoint.export import export_checkpoint

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    written = export_checkpoint(args.checkpoint, args.output, dtype=dtype, config=args.config)
    print(f"wrote {args.output} ({written} format, {args.dtype})")
    return 0


def _track_sync(args: argparse.Namespace) -> int:
    from ithaca.launcher.tracking.journal import find_journals
    from ithaca.launcher.tracking.push import JournalPusher, Unreachable, journal_uri, unpushed

    journals = find_journals(args.dir)
    if not journals:
        raise ValueError(f"{args.dir}: no tracking journal in {args.dir / 'tracking'}; give a run's train.output_dir")
    for journal in journals:
        uri = args.uri or journal_uri(journal)
        pusher = JournalPusher(journal, uri, wait_for_lock=False)
        try:
            sent = pusher.push()
        except Unreachable as err:
            raise ValueError(f"{uri} does not answer ({err}); {unpushed(journal, uri)} records of run {journal.stem} "
                             f"stay in {journal}: run this again when it answers") from None
        finally:
            pusher.close()
        print(f"run {journal.stem}: {f'pushed {sent} records' if sent else 'nothing left to push'} "
              f"(MLflow run {pusher.run_id} at {uri})")
    return 0


def _start_torchrun(cfg: RunConfig, nproc: int, max_restarts: int, argv: list[str]) -> int:
    """Re-run this command under torchrun on this machine; the launcher's own options are not passed on."""
    rest, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item in LAUNCHER_OPTIONS:
            skip = True
        elif not item.startswith(tuple(f"{option}=" for option in LAUNCHER_OPTIONS)):
            rest.append(item)
    from ithaca.launcher.runtime.local_torchrun import start_torchrun

    training = argv[:1] == ["train"]  # not `check`
    return start_torchrun(cfg, nproc, rest, max_restarts=max_restarts,
                          checkpoint_dir=cfg.checkpoint_dir if training else None)


def _quiet_library_warnings() -> None:
    """Hide import-time notices that are not about this run (megatron-core's optional extras)."""
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    warnings.filterwarnings("ignore", category=FutureWarning)
    if "DS_ACCELERATOR" not in os.environ:  # else DeepSpeed warns on every rank while guessing
        import torch

        os.environ["DS_ACCELERATOR"] = "cuda" if torch.cuda.is_available() else "cpu"
