"""Shared plumbing for the research scripts: configs, CLI, workdir writers, guards, data."""

from research.common.cli import run_cli
from research.common.config import (
    ConfigError,
    apply_override,
    check_config,
    load_config,
    parse_args,
)
from research.common.guard import NonFiniteLossError, check_finite, progress
from research.common.workdir import Workdir, markdown_table

__all__ = [
    "ConfigError",
    "NonFiniteLossError",
    "Workdir",
    "apply_override",
    "check_config",
    "check_finite",
    "load_config",
    "markdown_table",
    "parse_args",
    "progress",
    "run_cli",
]
