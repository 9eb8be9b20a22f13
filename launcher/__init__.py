"""The `ithaca` launcher: config, CLI, process groups, the training loop, checkpoints and tracking."""

from ithaca.launcher.config.schema import ConfigError, RunConfig
from ithaca.launcher.config.load import load_config

__all__ = ["ConfigError", "RunConfig", "load_config"]
