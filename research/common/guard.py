"""Training-loop helpers: a tqdm progress bar and the non-finite-loss guard."""

from __future__ import annotations

import math
import sys
from typing import Any

from tqdm.auto import tqdm


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; what the script wrote so far is kept in its workdir."""


def check_finite(value: Any, *, step: int, what: str, workdir: Any = None) -> float:
    """Return ``float(value)``, or raise NonFiniteLossError saying where it went wrong."""
    value = float(value)
    if not math.isfinite(value):
        kept = f"; outputs written so far are kept in {workdir}" if workdir is not None else ""
        raise NonFiniteLossError(
            f"{what}: loss became {value} at step {step}; stopping{kept}. "
            "Try a smaller learning rate."
        )
    return value


def progress(total: int, desc: str) -> tqdm:
    """A progress bar on stderr (updates at most twice a second)."""
    return tqdm(total=total, desc=desc, file=sys.stderr, mininterval=0.5, dynamic_ncols=True)
