"""Checks that need the run's facts (world size, data on disk), made before any process group starts."""

from __future__ import annotations

import os
from pathlib import Path

from ithaca.data.loader import check_stream_count
from ithaca.data.shards import Manifest, missing_shards, read_manifest
from ithaca.data.tokenizer import load_tokenizer
from ithaca.launcher.checkpoint.store import resolve_checkpoint
from ithaca.launcher.config.schema import ConfigError, DataConfig, RunConfig


def preflight(cfg: RunConfig, world_size: int, resume: str | None = None) -> None:
    """Raise ConfigError (or ValueError, for a missing checkpoint) naming the fix if this run cannot start."""
    cfg.check_world(world_size)
    if resume is not None:
        resolve_checkpoint(cfg.checkpoint_dir, resume)
    elif cfg.model.init_from is not None:  # a resume takes its weights from the checkpoint instead
        from ithaca.models.hf_llama import HFFolder, check_hf_config

        folder = HFFolder(cfg.model.init_from)
        check_hf_config(folder.config, cfg.model, str(folder.config_file))
    manifests = check_data(cfg.data, cfg.parallel.dp)
    vocab = manifests[0].tokenizer["vocab_size"]
    if cfg.model.vocab_size < vocab:
        raise ConfigError("model.vocab_size", cfg.model.vocab_size,
                          f"the shards' tokenizer has {vocab} ids; use at least {vocab}")
    if cfg.eval.every is not None:
        check_eval_data(cfg)


def check_eval_data(cfg: RunConfig) -> None:
    """The eval data that eval.metrics needs: its folder (eval.path, else data.path's holdout) with a
    readable manifest, enough tokens for the eval windows (loss, positions), and passkey prompts that
    fit eval.seq_len (passkey). Raises ConfigError or ValueError naming the fix."""
    from ithaca.launcher.eval.batches import eval_folder, eval_windows, scores_windows
    from ithaca.launcher.eval.passkey_prompts import run_prompts

    folder = eval_folder(cfg)
    try:
        manifest = read_manifest(folder)
    except ValueError as err:  # its message starts with "data.path=...: "
        where = "" if cfg.eval.path is not None else f"the holdout of data.path, {folder}: "
        raise ConfigError("eval.path", cfg.eval.path, where + str(err).partition(": ")[2]) from None
    if scores_windows(cfg):
        eval_windows(folder, manifest, cfg.eval_seq_len, cfg.eval.batches * cfg.train.global_batch)
    if "passkey" in cfg.eval.metrics:
        run_prompts(cfg, folder)


def check_kernels_here(cfg: RunConfig) -> None:
    """model.kernels=triton needs a GPU on the machine that trains (not where `ithaca submit` runs),
    or Triton's interpreter (TRITON_INTERPRET=1: CPU tests)."""
    import torch

    if cfg.model.kernels == "triton" and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError("model.kernels", "triton", "our Triton kernels run on CUDA GPUs and this machine has none; "
                          "use model.kernels=auto (or TRITON_INTERPRET=1 to run them interpreted, slowly, as the "
                          "tests do)")


def check_data(data: DataConfig, dp: int) -> list[Manifest]:
    """Every dataset's manifest, once each is readable, complete (under on_error: raise), split
    into enough shards for the run's streams, and prepped with the one expected tokenizer."""
    key = "data.path" if data.path is not None else "data.mixture"
    manifests = []
    for path in data.sources:
        try:
            manifest = read_manifest(path)
        except ValueError as err:  # its message starts with "data.path=...: "
            raise ConfigError(key, path, str(err).partition(": ")[2]) from None
        try:
            check_stream_count(Path(path), manifest, dp, data.workers)
        except ValueError as err:
            raise ConfigError("data.workers", data.workers, str(err)) from None
        missing = missing_shards(path, manifest)
        if missing and data.on_error == "raise":
            raise ConfigError(key, path, f"shard {missing[0]} is missing ({len(missing)} of {len(manifest.shards)}); "
                                         "restore it or re-run `ithaca prep`, or set data.on_error: skip")
        manifests.append(manifest)
    expected = manifests[0].tokenizer if data.tokenizer is None else _identity(data.tokenizer)
    for path, manifest in zip(data.sources, manifests):
        if manifest.tokenizer != expected:
            field = "data.tokenizer" if data.tokenizer is not None else key
            raise ConfigError(field, data.tokenizer or path,
                              f"{path} was prepped with tokenizer {manifest.tokenizer}, not {expected}; "
                              "train on shards prepped with one tokenizer (re-run `ithaca prep --tokenizer ...`)")
    return manifests


def _identity(spec: str) -> dict:
    try:
        return load_tokenizer(spec).identity()
    except ValueError as err:
        raise ConfigError("data.tokenizer", spec, str(err).partition(": ")[2]) from None


def check_memory(cfg: RunConfig, nproc: int, gpus_per_node: int | None = None, device_name: str | None = None) -> None:
    """Raise ConfigError when the plan's predicted peak per rank (launcher/plan/memory.py) exceeds what
    a rank has: the GPU's memory (this machine's, or the table's `device_name`), or on the CPU the
    machine's RAM shared by its ranks. The message names the largest term and the fastest layout of
    `nproc` ranks that fits."""
    from ithaca.launcher.plan.devices import GIB, load_device, this_machine
    from ithaca.launcher.plan.layouts import accepted_layouts
    from ithaca.launcher.plan.report import best_first, make_plan

    device = load_device(device_name) if device_name is not None else this_machine()
    per_node = gpus_per_node or nproc
    plan = make_plan(cfg, device, nproc, per_node)
    if plan.fits:
        return
    fitting = [p for p in best_first([make_plan(c, device, nproc, per_node) for c in accepted_layouts(cfg, nproc)])
               if p.fits]
    best = (f"the fastest that fits is {fitting[0].layout.short()} ({fitting[0].memory.total / GIB:.2f} GiB; "
            f"`ithaca plan --config ... --gpus {nproc}` lists them)" if fitting
            else f"no layout of {nproc} ranks fits: use a shorter data.seq_len, a smaller model or more memory")
    shared = f" ({device.memory_gib:g} GiB RAM shared by {per_node} ranks)" if device.name == "cpu" else ""
    raise ConfigError("parallel", plan.layout.short(),
                      f"predicted peak {plan.memory.total / GIB:.2f} GiB per rank exceeds the "
                      f"{plan.memory_limit / GIB:.2f} GiB a {device.name} rank has{shared}; largest term "
                      f"{plan.memory.largest} {plan.memory.as_dict()[plan.memory.largest] / GIB:.2f} GiB; {best}; "
                      f"or pass --force to run anyway")
