"""Rows, speed bars, CSV, Markdown and PNG plots of a benchmark run.

The limit of a case (``limit_ms``) is built from reference kernels timed in the same group, on
the same array, interleaved with the implementations:

* reading: ``(read)`` (a row sum of the logits) scaled to the bytes the case reads; on CPU at
  least ``(exp)`` (one exp per logit, summed), since cross-entropy needs that much;
* writing the gradient: ``(copy)`` minus ``(read)``, i.e. what writing a fresh logits-sized
  array costs on this machine (page faults included);
* the fused linear loss: one ``(matmul)`` (``x @ w``) forward, three forward + backward.

``fraction_of_limit = limit_ms / time_ms`` (1 is as fast as the hardware allows).
``gbps`` counts the logits (and labels) read once and the gradient written once;
``fraction_of_copy_bw`` divides it by the bandwidth of ``(copy)``.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from research.bench.cases import DTYPES, IMPLEMENTATIONS, LOSS_TITLES, MODES, Group, shape_text
from research.bench.timing import Runner, paired_ratio, summary
from research.common.workdir import markdown_table

MIB = 2**20
DTYPE_NAMES = tuple(DTYPES)
# Paired time ratios in every row: column -> the implementation of the same group it divides by.
BASELINES = {
    "vs_optax": "optax",
    "vs_xent_jax": "xent_jax",
    "vs_unfused": "xent_jax[unfused]",  # fused loss: x @ w, then xent_jax's plain loss
    "vs_none_ignored": "xent_jax[ignore_index]",  # fused loss: the same batch, no row ignored
}
BASELINE_ONLY_FOR = {"vs_none_ignored": ("xent_jax[half-ignored]",)}
# Why a bar is out of a CPU's reach, shown instead of a bare NO when it is missed on a CPU.
CPU_NOT_EXPECTED = {
    "float32 fwd+bwd: xent_jax / optax": (
        "writing a fresh logits-sized gradient (page faults) dominates both; the least work XLA "
        "can be given measured 0.81-0.86 (BENCHMARKS.md)"
    ),
    "float32 fwd: options / plain": (
        "label smoothing's class sum is one more pass over the logits on XLA:CPU (BENCHMARKS.md)"
    ),
}


def _ms(runner: Runner | None) -> float | None:
    return None if runner is None else summary(runner.wall)["median"]


def group_rows(group: Group, runners: Mapping[str, Runner], backend: str) -> list[dict]:
    """One row per implementation and mode of the group."""
    refs = {k: _ms(r) for k, r in runners.items() if r.mode is None}
    rows = []
    for runner in runners.values():
        if runner.mode is None:
            continue
        mode = runner.mode
        wall = summary(runner.wall)
        time_ms = wall["median"]
        read_bytes, write_bytes = group.read_bytes(), group.write_bytes(mode)
        moved = read_bytes + write_bytes
        row: dict[str, Any] = {
            "loss": group.loss,
            "mode": mode,
            "dtype": group.dtype,
            "shape": shape_text(group.shape),
            "elements": group.elements,
            "implementation": runner.name,
            "repeats": len(runner.wall),
            "calls_per_repeat": runner.calls_per_repeat,
            "compile_s": runner.compile_s,
            "time_ms": time_ms,
            "time_q25_ms": wall["q25"],
            "time_q75_ms": wall["q75"],
            "time_min_ms": wall["min"],
            "time_max_ms": wall["max"],
            "cpu_ms": float(np.median(runner.cpu) * 1e3),
            "bytes_moved": moved,
            "gbps": moved / (time_ms * 1e-3) / 1e9,
        }
        for column, base in BASELINES.items():
            other = runners.get(f"{base}|{mode}")
            only = BASELINE_ONLY_FOR.get(column)
            if only is not None and runner.name not in only:
                continue
            if other is not None and other is not runner:
                row[column] = paired_ratio(runner.wall, other.wall)
                row[f"{column}_cpu"] = paired_ratio(runner.cpu, other.cpu)
        row.update(_limits(group, mode, time_ms, read_bytes, write_bytes, refs, backend))
        row.update(runner.memory)
        rows.append(row)
    return rows


def _limits(group, mode, time_ms, read_bytes, write_bytes, refs, backend) -> dict[str, float]:
    if group.linear:
        matmul = refs.get("(matmul)")
        if not matmul:
            return {}
        n, d, v = group.shape
        passes = 1 if mode == "fwd" else 3
        limit = passes * matmul
        return {
            "limit_ms": limit,
            "fraction_of_limit": limit / time_ms,
            "tflops": group.flops(mode) / (time_ms * 1e-3) / 1e12,
            "matmul_tflops": 2 * n * d * v / (matmul * 1e-3) / 1e12,
        }
    copy, read = refs.get("(copy)"), refs.get("(read)")
    if not copy or not read:
        return {}
    logits_bytes = group.elements * group.itemsize
    read_time = read * read_bytes / logits_bytes
    exp = refs.get("(exp)")
    if exp:
        read_time = max(read_time, exp)
    write_time = max(copy - read, 0.0) * write_bytes / logits_bytes
    limit = read_time + write_time
    copy_gbps = 2 * logits_bytes / (copy * 1e-3) / 1e9
    moved = read_bytes + write_bytes
    out = {
        "copy_gbps": copy_gbps,
        "fraction_of_copy_bw": moved / (time_ms * 1e-3) / 1e9 / copy_gbps,
        "limit_ms": limit,
        "fraction_of_limit": limit / time_ms,
    }
    if exp and backend == "cpu":
        out["exp_passes"] = time_ms / exp
        out["exp_gelem_per_s"] = group.elements / (exp * 1e-3) / 1e9
    return out


def reference_rows(group: Group, runners: Mapping[str, Runner]) -> list[dict]:
    """The reference kernels of a group with the throughput they measure."""
    rows = []
    logits_bytes = group.elements * group.itemsize
    for runner in runners.values():
        if runner.mode is not None:
            continue
        ms = summary(runner.wall)["median"]
        row = {
            "loss": group.loss,
            "dtype": group.dtype,
            "shape": shape_text(group.shape),
            "kernel": runner.name,
            "time_ms": ms,
            "calls_per_repeat": runner.calls_per_repeat,
            "compile_s": runner.compile_s,
        }
        if runner.name == "(copy)":
            row["throughput"] = f"{2 * logits_bytes / (ms * 1e-3) / 1e9:.2f} GB/s (read + write)"
        elif runner.name == "(read)":
            row["throughput"] = f"{logits_bytes / (ms * 1e-3) / 1e9:.2f} GB/s (read)"
        elif runner.name == "(exp)":
            row["throughput"] = f"{group.elements / (ms * 1e-3) / 1e9:.2f} G exp/s"
        elif runner.name == "(matmul)":
            n, d, v = group.shape
            row["throughput"] = f"{2 * n * d * v / (ms * 1e-3) / 1e12:.3f} TFLOP/s"
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------
# Speed bars of the issue.
# --------------------------------------------------------------------------------------------


def _find(rows: Iterable[dict], **match) -> dict | None:
    for row in rows:
        if all(row.get(k) == v for k, v in match.items()):
            return row
    return None


def bar_status(bar: Mapping[str, Any], backend: str) -> str:
    """``yes``; on a CPU, a missed bar that a CPU is not expected to meet says so; else NO."""
    if bar["pass"]:
        return "yes"
    if backend == "cpu" and bar.get("cpu_not_expected"):
        return "no (CPU: not expected)"
    return "**NO**"


def all_bars(
    rows: Sequence[dict], config: Mapping[str, Any], accuracy: dict | None, backend: str
) -> list[dict]:
    """Every bar of a run (``config`` as a dict), each with its ``status``."""
    bars = speed_bars(rows, config.get("bar_shape", ""), accuracy)
    if config.get("fused_bars"):
        bars += fused_bars(rows, config["fused_bars"], backend)
    for bar in bars:
        bar["status"] = bar_status(bar, backend)
    return bars


def _fraction(value: float) -> str:
    return f"1/{round(1 / value)}" if 0 < value < 1 else f"{value:g}"


def fused_bars(rows: Sequence[dict], settings: Mapping[str, Any], backend: str) -> list[dict]:
    """The fused linear loss's bars at each shape of ``settings["shapes"]`` (loss + gradients
    for x and w): time and temporary memory against materialising ``x @ w`` (then optax's loss,
    or xent_jax's plain one), and half the rows ignored against none. On an accelerator the
    time and memory targets are ``accelerator_time`` and ``accelerator_memory``."""
    accelerator = backend != "cpu"
    memory_target = settings["accelerator_memory" if accelerator else "memory"]
    bars = []
    for shape, cpu_time_target in zip(settings["shapes"], settings["time"], strict=True):
        time_target = settings["accelerator_time"] if accelerator else cpu_time_target
        for dtype in DTYPE_NAMES:
            match = dict(loss="linear_softmax_int", mode="fwd_bwd", dtype=dtype, shape=shape)
            fused = _find(rows, implementation="xent_jax", **match)
            if fused is None:
                continue
            for base, column in (("optax", "vs_optax"), ("xent_jax", "vs_unfused")):
                impl = base if base == "optax" else "xent_jax[unfused]"
                base_row = _find(rows, implementation=impl, **match)
                if base_row is None or column not in fused:
                    continue
                value = fused[column]
                bars.append(
                    {
                        "bar": f"{dtype} fused fwd+bwd time / materialised ({base})",
                        "shape": shape,
                        "value": value,
                        "cpu_time_ratio": fused[f"{column}_cpu"],
                        "ratio_of_medians": fused["time_ms"] / base_row["time_ms"],
                        "target": f"<= {time_target:g}",
                        "pass": bool(value <= time_target),
                        "time_ms": fused["time_ms"],
                        "base_ms": base_row["time_ms"],
                    }
                )
                if fused.get("temp_bytes") is not None and base_row.get("temp_bytes"):
                    value = fused["temp_bytes"] / base_row["temp_bytes"]
                    bars.append(
                        {
                            "bar": f"{dtype} fused temporary memory / materialised ({base})",
                            "shape": shape,
                            "value": value,
                            "target": f"<= {_fraction(memory_target)} "
                            f"({fused['temp_bytes'] / MIB:.0f} vs "
                            f"{base_row['temp_bytes'] / MIB:.0f} MiB)",
                            "pass": bool(value <= memory_target),
                        }
                    )
            half = _find(rows, implementation="xent_jax[half-ignored]", **match)
            none_row = _find(rows, implementation="xent_jax[ignore_index]", **match)
            if half is not None and none_row is not None and "vs_none_ignored" in half:
                value = half["vs_none_ignored"]
                bars.append(
                    {
                        "bar": f"{dtype} fused fwd+bwd, half the rows ignored / none ignored",
                        "shape": shape,
                        "value": value,
                        "cpu_time_ratio": half["vs_none_ignored_cpu"],
                        "ratio_of_medians": half["time_ms"] / none_row["time_ms"],
                        "target": f"<= {settings['half_ignored']:g}",
                        "pass": bool(value <= settings["half_ignored"]),
                        "time_ms": half["time_ms"],
                    }
                )
    return bars


def speed_bars(rows: Sequence[dict], bar_shape: str, accuracy: dict | None) -> list[dict]:
    """The bars for integer-label softmax CE at ``bar_shape``, as paired ratios. A bar that a CPU
    is not expected to meet carries the reason as ``cpu_not_expected``."""
    bars = []

    def ratio_bar(title, mode, dtype, impl, base, bar, goal=None):
        row = _find(
            rows, loss="softmax_int", mode=mode, dtype=dtype, shape=bar_shape, implementation=impl
        )
        base_row = _find(
            rows, loss="softmax_int", mode=mode, dtype=dtype, shape=bar_shape, implementation=base
        )
        if row is None or base_row is None or f"vs_{base}" not in row:
            return
        value = row[f"vs_{base}"]
        bars.append(
            {
                "bar": title,
                "shape": bar_shape,
                "value": value,
                "cpu_time_ratio": row[f"vs_{base}_cpu"],
                "ratio_of_medians": row["time_ms"] / base_row["time_ms"],
                "target": f"<= {bar}" + (f" (goal {goal})" if goal else ""),
                "pass": bool(value <= bar),
                "time_ms": row["time_ms"],
                "base_ms": base_row["time_ms"],
                "cpu_not_expected": CPU_NOT_EXPECTED.get(title),
            }
        )

    ratio_bar(
        "float32 fwd+bwd: xent_jax / optax", "fwd_bwd", "float32", "xent_jax", "optax", 0.8, 0.6
    )
    ratio_bar("float32 fwd: xent_jax / optax", "fwd", "float32", "xent_jax", "optax", 1.0)
    for dtype in ("float32", "bfloat16"):
        for mode, label in (("fwd_bwd", "fwd+bwd"), ("fwd", "fwd")):
            ratio_bar(
                f"{dtype} {label}: options / plain",
                mode,
                dtype,
                "xent_jax[options]",
                "xent_jax",
                1.1,
            )
    ratio_bar("bfloat16 fwd+bwd: xent_jax / optax", "fwd_bwd", "bfloat16", "xent_jax", "optax", 1.0)
    ratio_bar("bfloat16 fwd: xent_jax / optax", "fwd", "bfloat16", "xent_jax", "optax", 1.0)
    if accuracy:
        value = accuracy["xent_jax_max_rel_error"]
        bars.append(
            {
                "bar": "bfloat16 loss: max relative error vs float64 reference",
                "shape": accuracy["shape"],
                "value": value,
                "target": "<= 0.001 (optax: {:.2g})".format(accuracy["optax_max_rel_error"]),
                "pass": bool(value <= 1e-3),
            }
        )
    return bars


# --------------------------------------------------------------------------------------------
# Files.
# --------------------------------------------------------------------------------------------


def bar_lines(bars: Sequence[Mapping[str, Any]], *, detail: bool = False) -> list[dict]:
    """The bars as table rows (``detail``: with the CPU-time ratio and the ratio of medians)."""
    lines = []
    for b in bars:
        line = {"bar": b["bar"], "shape": b["shape"], "value": _fmt(b["value"])}
        if detail:
            line["cpu-time ratio"] = _fmt(b.get("cpu_time_ratio"))
            line["ratio of medians"] = _fmt(b.get("ratio_of_medians"))
        line["target"] = b["target"]
        line["met"] = b.get("status", "yes" if b["pass"] else "**NO**")
        lines.append(line)
    return lines


def write_csv(path: Path, rows: Sequence[dict]) -> None:
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})


def _fmt(value, digits=3):
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return f"{value:.{digits}g}"


def _mib(value):
    return "" if value is None else f"{value / MIB:.1f}"


def results_table(rows: Sequence[dict], loss: str, mode: str) -> str:
    selected = [r for r in rows if r["loss"] == loss and r["mode"] == mode]
    if not selected:
        return ""
    table = []
    for r in selected:
        spread = f"[{_fmt(r['time_q25_ms'])}, {_fmt(r['time_q75_ms'])}]"
        entry = {
            "dtype": r["dtype"],
            "shape": r["shape"],
            "implementation": r["implementation"],
            "time ms": _fmt(r["time_ms"]),
            "IQR ms": spread,
            "cpu ms": _fmt(r["cpu_ms"]),
            "x optax": _fmt(r.get("vs_optax")),
            "compile s": _fmt(r["compile_s"], 2),
        }
        if loss == "linear_softmax_int":
            entry["x unfused"] = _fmt(r.get("vs_unfused"))
            entry["x none ignored"] = _fmt(r.get("vs_none_ignored"))
            entry["TFLOP/s"] = _fmt(r.get("tflops"))
        else:
            entry["GB/s"] = _fmt(r["gbps"])
            entry["of copy BW"] = _fmt(r.get("fraction_of_copy_bw"), 2)
        entry["of limit"] = _fmt(r.get("fraction_of_limit"), 2)
        if "exp_passes" in r:
            entry["exp passes"] = _fmt(r["exp_passes"], 2)
        entry["temp MiB"] = _mib(r.get("temp_bytes"))
        table.append(entry)
    return markdown_table(table)


def environment_table(env: Mapping[str, Any]) -> str:
    keys = [
        "started",
        "command",
        "backend",
        "device_kind",
        "num_devices",
        "cpu_count",
        "load_average_start",
        "load_average_end",
        "jax",
        "jaxlib",
        "optax",
        "xent_jax",
        "torch",
        "numpy",
        "python",
        "XLA_FLAGS",
        "GLIBC_TUNABLES",
        "donate_logits",
        "ffi_kernel_sha256",
    ]
    return markdown_table([{"key": k, "value": env.get(k)} for k in keys if k in env])


def markdown_report(
    env: Mapping[str, Any],
    rows: Sequence[dict],
    refs: Sequence[dict],
    bars: Sequence[dict],
    skipped: Sequence[dict],
) -> str:
    parts = ["# xent_jax benchmark\n", environment_table(env)]
    parts.append(
        "\nTimes are medians over interleaved repeats (IQR in brackets), wall clock; `cpu ms` is "
        "process CPU time (all threads). `x optax` is the median over repeats of the per-repeat "
        "ratio to optax timed in the same repeat (fused loss: `x unfused` to `x @ w` + "
        "xent_jax's plain loss, `x none ignored` to the same call on the batch with no row "
        "ignored). See `research/bench/report.py` for the limit model.\n"
    )
    if bars:
        parts.append("\n## Bars\n")
        parts.append(
            "Paired ratios (median over repeats of the per-repeat ratio) unless the bar says "
            "otherwise. On a CPU, a missed bar that a CPU is not expected to meet reads "
            "`no (CPU: not expected)`; the reasons are listed below the table.\n"
        )
        parts.append(markdown_table(bar_lines(bars, detail=True)))
        notes = {b["bar"]: b["cpu_not_expected"] for b in bars if b.get("cpu_not_expected")}
        if notes and env.get("backend") == "cpu":
            parts.append("")
            parts.extend(f"* {bar}: CPU not expected: {why}." for bar, why in notes.items())
            parts.append("")
    if refs:
        parts.append("\n## Reference kernels (limits, same run)\n")
        parts.append(markdown_table(refs, formats={"time_ms": ".4g", "compile_s": ".2g"}))
    for loss in LOSS_TITLES:
        for mode in MODES:
            table = results_table(rows, loss, mode)
            if table:
                label = "forward" if mode == "fwd" else "forward + backward"
                parts.append(f"\n## {LOSS_TITLES[loss]}: {label}\n")
                parts.append(table)
    if skipped:
        parts.append("\n## Skipped\n")
        parts.append(markdown_table(skipped))
    return "\n".join(parts)


_STYLES = {"float32": "-", "bfloat16": "--"}
_COLORS = dict(
    zip(IMPLEMENTATIONS, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False)
)


def _grid(rows: Sequence[dict]):
    losses = [loss for loss in LOSS_TITLES if any(r["loss"] == loss for r in rows)]
    fig, axes = plt.subplots(len(losses), 2, figsize=(12, 3.6 * max(len(losses), 1)), squeeze=False)
    return fig, axes, losses


def _series(rows: Sequence[dict], loss: str, mode: str, impl: str, dtype: str) -> list[dict]:
    """The rows of one plotted line: one loss, mode, implementation and dtype."""
    key = (loss, mode, impl, dtype)
    return [r for r in rows if (r["loss"], r["mode"], r["implementation"], r["dtype"]) == key]


def plot_time_vs_size(path: Path, rows: Sequence[dict], refs: Sequence[dict]) -> None:
    fig, axes, losses = _grid(rows)
    for i, loss in enumerate(losses):
        for j, mode in enumerate(MODES):
            ax = axes[i, j]
            for impl in IMPLEMENTATIONS:
                for dtype, style in _STYLES.items():
                    sel = _series(rows, loss, mode, impl, dtype)
                    if not sel:
                        continue
                    sel.sort(key=lambda r: r["elements"])
                    x = [r["elements"] for r in sel]
                    y = [r["time_ms"] for r in sel]
                    lo = [r["time_ms"] - r["time_q25_ms"] for r in sel]
                    hi = [r["time_q75_ms"] - r["time_ms"] for r in sel]
                    ax.errorbar(
                        x,
                        y,
                        yerr=[lo, hi],
                        linestyle=style,
                        marker="o",
                        markersize=3,
                        color=_COLORS.get(impl),
                        label=f"{impl} {dtype}",
                        capsize=2,
                    )
            kernel = "(matmul)" if loss == "linear_softmax_int" else "(copy)"
            for dtype, style in _STYLES.items():
                sel = sorted(
                    (
                        r
                        for r in refs
                        if (r["loss"], r["kernel"], r["dtype"]) == (loss, kernel, dtype)
                    ),
                    key=lambda r: _elements(r["shape"]),
                )
                if sel:
                    ax.plot(
                        [_elements(r["shape"]) for r in sel],
                        [r["time_ms"] for r in sel],
                        linestyle=style,
                        color="gray",
                        linewidth=1,
                        marker="x",
                        markersize=4,
                        label=f"{kernel} {dtype}",
                    )
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("logits (N x K)")
            ax.set_ylabel("median time (ms)")
            label = "forward" if mode == "fwd" else "forward + backward"
            ax.set_title(f"{LOSS_TITLES[loss]}: {label}", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _elements(shape: str) -> int:
    sizes = [int(s) for s in shape.split("x")]
    return sizes[0] * sizes[-1]


def plot_fraction_of_limit(path: Path, rows: Sequence[dict]) -> None:
    fig, axes, losses = _grid(rows)
    for i, loss in enumerate(losses):
        for j, mode in enumerate(MODES):
            ax = axes[i, j]
            for impl in IMPLEMENTATIONS:
                for dtype, style in _STYLES.items():
                    sel = [
                        r
                        for r in _series(rows, loss, mode, impl, dtype)
                        if r.get("fraction_of_limit") is not None
                    ]
                    if not sel:
                        continue
                    sel.sort(key=lambda r: r["elements"])
                    ax.plot(
                        [r["elements"] for r in sel],
                        [r["fraction_of_limit"] for r in sel],
                        linestyle=style,
                        marker="o",
                        markersize=3,
                        color=_COLORS.get(impl),
                        label=f"{impl} {dtype}",
                    )
            ax.axhline(1.0, color="gray", linewidth=1)
            ax.set_xscale("log")
            shown = [
                r["fraction_of_limit"]
                for r in rows
                if (r["loss"], r["mode"]) == (loss, mode) and r.get("fraction_of_limit")
            ]
            ax.set_ylim(0, max([1.25, *[1.05 * f for f in shown]]))
            ax.set_xlabel("logits (N x K)")
            ax.set_ylabel("fraction of the limit")
            label = "forward" if mode == "fwd" else "forward + backward"
            ax.set_title(f"{LOSS_TITLES[loss]}: {label}", fontsize=9)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
