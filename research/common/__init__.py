"""Shared plumbing for the research scripts: configs, CLI, workdir writers, guards, data."""

from research.common.config import ConfigError, check_config, get_config
from research.common.guard import NonFiniteLossError, check_finite, progress
from research.common.workdir import Workdir, markdown_table

__all__ = [
    "ConfigError",
    "NonFiniteLossError",
    "Workdir",
    "check_config",
    "check_finite",
    "get_config",
    "markdown_table",
    "progress",
]
