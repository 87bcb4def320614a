"""Memory and speed of the fused linear + cross-entropy against the materialised version.

Both compute the mean loss and its gradients with respect to ``x`` and ``w``:

* fused: ``xent_jax.linear_softmax_cross_entropy_with_integer_labels(x, w, y, reduction="mean")``
* materialised: ``optax.softmax_cross_entropy_with_integer_labels(x @ w, y).mean()``

Memory is XLA's own account of the compiled program, ``jax.jit(f).lower(...).compile()
.memory_analysis()`` (temporary buffers: everything but arguments and outputs); on a GPU the
peak of the device's memory statistics is added. Time is the median over ``--repeats`` calls
after ``--warmup`` calls (each ended by ``block_until_ready``); the two functions alternate so
that both see the same machine load. Compile time is reported separately.

    python -m research.bench_fused                  # N=8192, D=512, V=32768, float32
    python -m research.bench_fused --quick          # small shapes, for tests
    python -m research.bench_fused --n 4096 --v 65536 --out bench_runs/fused

Writes ``result.json`` and ``result.md`` to ``--out`` (default ``bench_runs/fused``) and prints
the Markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import xent_jax
from xent_jax._fused import linear_softmax_cross_entropy_with_integer_labels

# The bar of the issue: fused temporary memory at most 1/16 of the materialised one.
MEMORY_BAR = 1 / 16
QUICK = {"n": 1024, "d": 128, "v": 8192, "repeats": 3, "warmup": 1}
FULL = {"n": 8192, "d": 512, "v": 32768, "repeats": 5, "warmup": 1}


def materialised_loss(x, w, y):
    return optax.softmax_cross_entropy_with_integer_labels(x @ w, y).mean()


def fused_loss(block_size_tokens=None, block_size_vocab=None):
    def loss(x, w, y):
        return linear_softmax_cross_entropy_with_integer_labels(
            x,
            w,
            y,
            reduction="mean",
            block_size_tokens=block_size_tokens,
            block_size_vocab=block_size_vocab,
        )

    return loss


def _inputs(n: int, d: int, v: int, dtype, seed: int = 0):
    kx, kw, ky = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (n, d), jnp.float32).astype(dtype)
    w = (jax.random.normal(kw, (d, v), jnp.float32) / np.sqrt(d)).astype(dtype)
    y = jax.random.randint(ky, (n,), 0, v, jnp.int32)
    return x, w, y


def compile_stats(loss_fn, x, w, y) -> tuple[Any, dict[str, float]]:
    """Compiles value_and_grad (x, w) of ``loss_fn``; returns (compiled, memory / compile stats)."""
    fn = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)))
    start = time.perf_counter()
    compiled = fn.lower(x, w, y).compile()
    compile_s = time.perf_counter() - start
    mem = compiled.memory_analysis()
    stats = {
        "compile_s": compile_s,
        "temp_bytes": int(mem.temp_size_in_bytes),
        "argument_bytes": int(mem.argument_size_in_bytes),
        "output_bytes": int(mem.output_size_in_bytes),
    }
    return compiled, stats


def _device_peak() -> int | None:
    stats = jax.devices()[0].memory_stats() if jax.default_backend() != "cpu" else None
    return None if not stats else int(stats.get("peak_bytes_in_use", 0))


def time_interleaved(fns: dict[str, Any], args, repeats: int, warmup: int) -> dict[str, list]:
    for _ in range(warmup):
        for fn in fns.values():
            jax.block_until_ready(fn(*args))
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - start)
    return times


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def run(
    n: int,
    d: int,
    v: int,
    *,
    dtype: str = "float32",
    repeats: int = 5,
    warmup: int = 1,
    block_size_tokens: int | None = None,
    block_size_vocab: int | None = None,
    measure_time: bool = True,
    execute: bool = True,
) -> dict[str, Any]:
    """Measures both versions on one shape; returns a JSON-able dict.

    ``execute=False`` only compiles (memory figures, no agreement check, no timing).
    """
    x, w, y = _inputs(n, d, v, jnp.dtype(dtype))
    fused = fused_loss(block_size_tokens, block_size_vocab)
    result: dict[str, Any] = {
        "shape": {"N": n, "D": d, "V": v, "dtype": dtype},
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "jax": jax.__version__,
        "xent_jax": xent_jax.__version__,
        "block_size_tokens": block_size_tokens,
        "block_size_vocab": block_size_vocab,
        "flops_materialised": 6 * n * d * v,
    }
    compiled = {}
    for name, fn in (("fused", fused), ("materialised", materialised_loss)):
        compiled[name], result[name] = compile_stats(fn, x, w, y)
    result["temp_ratio"] = result["fused"]["temp_bytes"] / max(
        result["materialised"]["temp_bytes"], 1
    )
    result["memory_bar"] = MEMORY_BAR
    result["meets_memory_bar"] = result["temp_ratio"] <= MEMORY_BAR
    if not execute:
        return result

    outs = {name: c(x, w, y) for name, c in compiled.items()}
    (lf, (gxf, gwf)), (lm, (gxm, gwm)) = outs["fused"], outs["materialised"]
    result["agreement"] = {
        "loss_rel": _rel(lf, lm),
        "grad_x_rel": _rel(gxf, gxm),
        "grad_w_rel": _rel(gwf, gwm),
    }
    for name in compiled:
        peak = _device_peak()
        if peak is not None:
            result[name]["device_peak_bytes"] = peak
    if measure_time:
        times = time_interleaved(compiled, (x, w, y), repeats, warmup)
        for name, ts in times.items():
            result[name]["time_s"] = ts
            result[name]["time_median_s"] = statistics.median(ts)
            result[name]["time_min_s"] = min(ts)
        result["time_ratio"] = (
            result["fused"]["time_median_s"] / result["materialised"]["time_median_s"]
        )
        result["time_ratio_min"] = (
            result["fused"]["time_min_s"] / result["materialised"]["time_min_s"]
        )
        result["repeats"], result["warmup"] = repeats, warmup
    return result


def markdown(result: dict[str, Any]) -> str:
    s = result["shape"]
    mib = lambda b: f"{b / 2**20:,.1f}"
    lines = [
        f"### Fused linear cross-entropy, N={s['N']}, D={s['D']}, V={s['V']}, {s['dtype']} "
        f"({result['backend']}: {result['device']})",
        "",
        "loss + gradients for x and w; memory from `compile().memory_analysis()`",
        "",
        "| | fused | materialised | ratio |",
        "|---|---:|---:|---:|",
    ]
    f, m = result["fused"], result["materialised"]
    lines.append(
        f"| temp MiB | {mib(f['temp_bytes'])} | {mib(m['temp_bytes'])} | "
        f"{result['temp_ratio']:.4f} (bar {MEMORY_BAR:.4f}: "
        f"{'met' if result['meets_memory_bar'] else 'NOT met'}) |"
    )
    lines.append(
        f"| argument + output MiB | {mib(f['argument_bytes'] + f['output_bytes'])} | "
        f"{mib(m['argument_bytes'] + m['output_bytes'])} | |"
    )
    if "time_ratio" in result:
        lines.append(
            f"| time median s | {f['time_median_s']:.3f} | {m['time_median_s']:.3f} | "
            f"{result['time_ratio']:.3f} |"
        )
        lines.append(
            f"| time min s | {f['time_min_s']:.3f} | {m['time_min_s']:.3f} | "
            f"{result['time_ratio_min']:.3f} |"
        )
    lines.append(f"| compile s | {f['compile_s']:.2f} | {m['compile_s']:.2f} | |")
    if "agreement" in result:
        a = result["agreement"]
        lines += [
            "",
            f"agreement (max abs diff / max abs): loss {a['loss_rel']:.2e}, grad x "
            f"{a['grad_x_rel']:.2e}, grad w {a['grad_w_rel']:.2e}",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"small shapes: {QUICK}")
    parser.add_argument("--n", type=int, default=None)
    parser.add_argument("--d", type=int, default=None)
    parser.add_argument("--v", type=int, default=None)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--block_size_tokens", type=int, default=None)
    parser.add_argument("--block_size_vocab", type=int, default=None)
    parser.add_argument("--no_time", action="store_true", help="memory only (compile, no runs)")
    parser.add_argument("--out", default="bench_runs/fused")
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else FULL
    pick = lambda name: getattr(args, name) if getattr(args, name) is not None else preset[name]
    result = run(
        pick("n"),
        pick("d"),
        pick("v"),
        dtype=args.dtype,
        repeats=pick("repeats"),
        warmup=pick("warmup"),
        block_size_tokens=args.block_size_tokens,
        block_size_vocab=args.block_size_vocab,
        measure_time=not args.no_time,
        execute=not args.no_time,
    )
    result["command"] = "python -m research.bench_fused " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    (out / "result.md").write_text(text)
    print(text)
    return result


if __name__ == "__main__":
    main()
