"""Compiling (timed on its own), warm-up, and interleaved repeats of wall and CPU time.

Every runner of a group is called once within each repeat, in a random order, so that all of
them see the same machine load; each call uses the next of several pre-generated input sets and
ends with ``block_until_ready``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np


@dataclass
class Runner:
    """One timed thing: an implementation in one mode, or a reference kernel (``mode=None``)."""

    name: str
    mode: str | None
    call: Callable[[int], Any]
    compile_s: float | None = None
    memory: dict[str, int] = field(default_factory=dict)
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    @property
    def key(self) -> str:
        return self.name if self.mode is None else f"{self.name}|{self.mode}"


def memory_of(compiled: Any) -> dict[str, int]:
    """XLA's account of a compiled program (bytes); empty where the backend gives none."""
    try:
        stats = compiled.memory_analysis()
    except Exception:
        return {}
    if stats is None:
        return {}
    names = {
        "temp_bytes": "temp_size_in_bytes",
        "argument_bytes": "argument_size_in_bytes",
        "output_bytes": "output_size_in_bytes",
        "alias_bytes": "alias_size_in_bytes",
        "code_bytes": "generated_code_size_in_bytes",
    }
    return {k: int(getattr(stats, v)) for k, v in names.items() if hasattr(stats, v)}


def device_peak_bytes() -> int | None:
    """Peak bytes in use on the first device (GPU/TPU); None on CPU."""
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:
        return None
    return None if not stats else stats.get("peak_bytes_in_use")


def jax_runner(name: str, mode: str | None, fn: Callable, inputs: Sequence[tuple]) -> Runner:
    """Lower and compile ``fn`` for the inputs (timed), then call the compiled executable."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*inputs[0]).compile()
    compile_s = time.perf_counter() - start

    def call(i: int):
        return jax.block_until_ready(compiled(*inputs[i % len(inputs)]))

    return Runner(name, mode, call, compile_s, memory_of(compiled))


def torch_runner(name: str, mode: str, fn: Callable, inputs: Sequence[tuple]) -> Runner:
    """PyTorch runs eagerly: nothing to compile (compile time is reported as absent)."""

    def call(i: int):
        return fn(*inputs[i % len(inputs)])

    return Runner(name, mode, call, None, {})


def time_interleaved(
    runners: Sequence[Runner],
    *,
    repeats: int,
    warmup: int,
    seed: int = 0,
    on_call: Callable[[], None] = lambda: None,
) -> None:
    """Fills ``runner.wall`` and ``runner.cpu`` (seconds per call) for every runner.

    Each repeat calls every runner once, in a fresh random order (so that no runner always
    follows the same one). PyTorch runners form a block of their own after the JAX ones: their
    OpenMP threads keep spinning after a call and would slow down whatever XLA runs next.
    """
    blocks = [
        [r for r in runners if r.name != "torch"],
        [r for r in runners if r.name == "torch"],
    ]
    rng = np.random.default_rng(seed)
    for w in range(warmup):
        for block in blocks:
            for k, runner in enumerate(block):
                runner.call(w + k)
                on_call()
    for r in range(repeats):
        for block in blocks:
            for k in rng.permutation(len(block)):
                runner = block[k]
                index = warmup + r + int(k)
                cpu_start = time.process_time()
                start = time.perf_counter()
                runner.call(index)
                runner.wall.append(time.perf_counter() - start)
                runner.cpu.append(time.process_time() - cpu_start)
                on_call()


def summary(seconds: Sequence[float]) -> dict[str, float]:
    """Median, quartiles, min and max in milliseconds."""
    values = np.asarray(seconds, np.float64) * 1e3
    q25, median, q75 = np.percentile(values, [25, 50, 75])
    return {
        "median": float(median),
        "q25": float(q25),
        "q75": float(q75),
        "min": float(values.min()),
        "max": float(values.max()),
    }


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """Median over repeats of the per-repeat ratio (both timed in the same repeat)."""
    a, b = np.asarray(numerator, np.float64), np.asarray(denominator, np.float64)
    n = min(len(a), len(b))
    return float(np.median(a[:n] / b[:n])) if n else float("nan")
