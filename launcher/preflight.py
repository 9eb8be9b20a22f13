"""Checks that need the run's facts (world size, data on disk), made before any process group starts."""

from __future__ import annotations

from ithaca.data.shards import read_manifest
from ithaca.launcher.checkpoint import resolve_checkpoint
from ithaca.launcher.config import ConfigError, RunConfig


def preflight(cfg: RunConfig, world_size: int, resume: str | None = None) -> None:
    """Raise ConfigError (or ValueError, for a missing checkpoint) naming the fix if this run cannot start."""
    cfg.check_world(world_size)
    if resume is not None:
        resolve_checkpoint(cfg.checkpoint_dir, resume)
    try:
        manifest = read_manifest(cfg.data.path)
    except ValueError as err:
        raise ConfigError("data.path", cfg.data.path, str(err).partition(": ")[2]) from None
    vocab = manifest.tokenizer["vocab_size"]
    if cfg.model.vocab_size < vocab:
        raise ConfigError("model.vocab_size", cfg.model.vocab_size,
                          f"the shards' tokenizer has {vocab} ids; use at least {vocab}")
