"""Training-loop helpers: a tqdm progress bar and the non-finite-loss guard."""

from __future__ import annotations

import math
import sys
import time
from typing import Any, TextIO

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


class LogProgress:
    """A progress bar's interface for a log file: nothing while it runs, one line when it closes
    (a bar redrawn with carriage returns would leave run-on lines in a redirected log)."""

    def __init__(self, total: int, desc: str, file: TextIO):
        self.total, self.desc, self.file = total, desc, file
        self.n = 0
        self.postfix = ""
        self.start = time.perf_counter()

    def update(self, count: int = 1) -> None:
        self.n += count

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text

    def close(self) -> None:
        elapsed = time.perf_counter() - self.start
        tail = f" ({self.postfix})" if self.postfix else ""
        print(f"{self.desc}: {self.n}/{self.total} in {elapsed:.1f} s{tail}", file=self.file)

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(total: int, desc: str, file: TextIO | None = None) -> tqdm | LogProgress:
    """A progress bar on ``file`` (default stderr) when it is a terminal (updates at most twice
    a second); otherwise one summary line when the work is done."""
    file = sys.stderr if file is None else file
    if not (hasattr(file, "isatty") and file.isatty()):
        return LogProgress(total, desc, file)
    return tqdm(total=total, desc=desc, file=file, mininterval=0.5, dynamic_ncols=True)
