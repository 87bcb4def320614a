"""``run_cli``: the command-line entry point shared by every research script."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from research.common.config import ConfigError, parse_args
from research.common.guard import NonFiniteLossError


def default_workdir(name: str) -> Path:
    return Path("runs") / "scripts" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def run_cli(main: Callable[[Any, Path], Any], name: str, argv: Sequence[str] | None = None) -> int:
    """Parse argv, run ``main(config, workdir)``; exit status 2 for config errors, 1 for a
    non-finite loss (the workdir keeps what was written before)."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        config, workdir = parse_args(argv, name)
        workdir = workdir or default_workdir(name)
        main(config, workdir)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except NonFiniteLossError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"{name}: results in {workdir}")
    return 0
