"""Compiling (timed on its own), warm-up, and interleaved repeats of wall and CPU time.

Every runner of a group is timed once within each repeat, in a random order, so that all of
them see the same machine load; each call uses the next of several pre-generated input sets and
ends with ``block_until_ready``.

On an accelerator, one timed call would also count the host's dispatch and the wait for the
result (tens of microseconds, ~10% of a millisecond kernel). There a repeat launches
``calls_per_repeat`` calls back to back (each on the next input set; the device runs them in
order while the host queues the next) and waits for the last one only: the time per call is the
repeat's time over the number of calls, which is the device's time once the queue is full.

With ``donate`` a runner's program takes its logits as a donated buffer, so that XLA may write
the gradient into them in place: each call then gets a fresh copy of its input set's logits,
made (and waited for) before the clock starts, after which the other input sets are read once
so that the copy is no longer in the caches. That takes the allocation of a fresh output
buffer (on CPU: a page fault per 4 KiB page) out of the timing, and leaves the compute.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def _no_wait(result: Any) -> Any:
    return result


def _index(i: int) -> int:
    return i


@dataclass
class Runner:
    """One timed thing: an implementation in one mode, or a reference kernel (``mode=None``).

    ``stage(i)`` prepares a call on input set ``i`` (untimed; by default just the index),
    ``launch(staged)`` starts it and may return before the device is done; ``wait(result)``
    blocks until that result is ready.
    """

    name: str
    mode: str | None
    launch: Callable[[Any], Any]
    wait: Callable[[Any], Any] = _no_wait
    compile_s: float | None = None
    memory: dict[str, int] = field(default_factory=dict)
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    calls_per_repeat: int = 1
    stage: Callable[[int], Any] = _index

    @property
    def key(self) -> str:
        return self.name if self.mode is None else f"{self.name}|{self.mode}"

    def call(self, i: int) -> Any:
        """One call on input set ``i``, waited for."""
        return self.wait(self.launch(self.stage(i)))

    def staged(self, first: int, count: int) -> list[Any]:
        """What ``count`` calls on consecutive input sets from ``first`` need (not timed)."""
        return [self.stage(first + j) for j in range(count)]

    def run(self, staged: list[Any]) -> None:
        """The staged calls, launched back to back, the last waited for (the device runs them
        in order). Only the newest result is kept alive."""
        result = None
        for j in range(len(staged)):
            result = self.launch(staged[j])
            staged[j] = None  # a donated copy is the call's own: drop our reference
        self.wait(result)

    def calls(self, first: int, count: int) -> None:
        self.run(self.staged(first, count))


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


def jax_runner(
    name: str, mode: str | None, fn: Callable, inputs: Sequence[tuple], *, donate: bool = False
) -> Runner:
    """Lower and compile ``fn`` for the inputs (timed), then call the compiled executable.

    With ``donate`` the first argument is donated and every call gets a fresh copy of it.
    """
    start = time.perf_counter()
    compiled = jax.jit(fn, donate_argnums=0 if donate else ()).lower(*inputs[0]).compile()
    compile_s = time.perf_counter() - start
    memory = memory_of(compiled)
    if not donate:
        return Runner(
            name,
            mode,
            lambda i: compiled(*inputs[i % len(inputs)]),
            jax.block_until_ready,
            compile_s,
            memory,
        )
    copy = jax.jit(lambda x: x.copy())
    read_all = jax.jit(lambda arrays: [jnp.sum(x) for x in arrays])

    def stage(i: int) -> tuple:
        first, *rest = inputs[i % len(inputs)]
        fresh = jax.block_until_ready(copy(first))
        # Read every other input set once, so that the fresh copy has left the caches by the
        # time the clock starts, as a rotated input set has.
        others = [item[0] for j, item in enumerate(inputs) if j != i % len(inputs)]
        jax.block_until_ready(read_all(others))
        return (fresh, *rest)

    def launch(args: tuple):
        return compiled(*args)

    return Runner(name, mode, launch, jax.block_until_ready, compile_s, memory, stage=stage)


def torch_runner(
    name: str, mode: str, fn: Callable, inputs: Sequence[tuple], synchronize: Callable[[], Any]
) -> Runner:
    """PyTorch runs eagerly: nothing to compile (compile time is reported as absent).
    ``synchronize`` waits for the device (``torch.cuda.synchronize``; nothing on CPU)."""

    def launch(i: int):
        return fn(*inputs[i % len(inputs)])

    def wait(result):
        synchronize()
        return result

    return Runner(name, mode, launch, wait, None, {})


def calls_for(runner: Runner, first: int, target_s: float, max_calls: int) -> int:
    """Calls per repeat that make a repeat last about ``target_s`` (from one waited call)."""
    staged = runner.staged(first, 1)
    start = time.perf_counter()
    runner.run(staged)
    single = max(time.perf_counter() - start, 1e-9)
    return int(min(max(1, round(target_s / single)), max_calls))


def time_interleaved(
    runners: Sequence[Runner],
    *,
    repeats: int,
    warmup: int,
    seed: int = 0,
    batch_s: float = 0.0,
    max_calls: int = 1,
    on_call: Callable[[], None] = lambda: None,
) -> None:
    """Fills ``runner.wall`` and ``runner.cpu`` (seconds per call) for every runner.

    Each repeat times every runner once, in a fresh random order (so that no runner always
    follows the same one). PyTorch runners form a block of their own after the JAX ones: their
    OpenMP threads keep spinning after a call and would slow down whatever XLA runs next. With
    ``batch_s > 0`` (accelerators) a runner's repeat is ``calls_per_repeat`` back-to-back calls
    lasting about ``batch_s`` in all (at most ``max_calls``), set after the warm-up.
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
    if batch_s > 0:
        for k, runner in enumerate(runners):
            runner.calls_per_repeat = calls_for(runner, warmup + k, batch_s, max_calls)
    for r in range(repeats):
        for block in blocks:
            for k in rng.permutation(len(block)):
                runner = block[k]
                count = runner.calls_per_repeat
                index = (warmup + r + int(k)) * count
                staged = runner.staged(index, count)
                cpu_start = time.process_time()
                start = time.perf_counter()
                runner.run(staged)
                runner.wall.append((time.perf_counter() - start) / count)
                runner.cpu.append((time.process_time() - cpu_start) / count)
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
