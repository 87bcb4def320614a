"""Benchmark of the xent_jax losses against optax, plain ``jax.numpy`` and PyTorch (when it is
installed), with the hardware limits measured in the same run on the same device.

    python -m research.benchmark --config configs/benchmark.py          # make bench
    python -m research.benchmark --config configs/benchmark.py:quick    # make bench-quick
    python -m research.benchmark --config configs/benchmark.py:fused    # make bench-fused
    python -m research.benchmark --config configs/benchmark.py:quick --workdir /tmp/bench \
        --config.repeats=3 --config.dtypes=float32

Cases: integer-label and dense softmax cross-entropy, sigmoid BCE and the fused linear softmax
cross-entropy, each forward (the mean loss) and forward + backward (``jax.grad`` of the mean
loss; for the fused loss the loss and its gradients with respect to ``x`` and ``w``), in float32
and bfloat16, over the configured shapes. The fused loss is timed against materialising
``x @ w`` (then optax's loss, or xent_jax's plain loss: ``xent_jax[unfused]``), and with half
the rows' labels set to ``ignore_index`` (``xent_jax[half-ignored]``) against the same call on
the same batch with none ignored (``xent_jax[ignore_index]``).

Timing: every implementation of a group (loss x dtype x shape) is compiled first (compile time is
reported on its own), warmed up, then timed in interleaved repeats (random order per repeat;
PyTorch in a block of its own) together with reference kernels on the same arrays ``(copy)``,
``(read)``, ``(exp)`` (CPU) and ``(matmul)`` (fused loss), which give the limits (see
``research/bench/report.py``). Each call takes the next of several pre-generated input sets
(enough that they do not fit in the caches) and ends with ``block_until_ready``. Reported:
median and IQR of the wall time, median CPU time, the paired ratios, bytes moved, GB/s, fraction
of the copy bandwidth and of the limit, exp passes (CPU) and XLA's temporary memory
(``jax.jit(f).lower(...).compile().memory_analysis()``; device peak on GPU/TPU).

Bars: the integer-label softmax bars at ``bar_shape`` and the fused loss's bars at
``fused_bars.shapes``. On a CPU, a missed bar that a CPU is not expected to meet is labelled
``no (CPU: not expected)`` with the reason, instead of a bare NO.

Writes to the workdir (default ``bench_runs/<stamp>/``): ``results.jsonl`` (the environment, then
one line per reference kernel and per case, the bars and a summary), ``results.csv``,
``results.md``, ``time_vs_size.png``, ``fraction_of_limit.png`` and ``config.json``.
``python -m research.benchmark --rebuild DIR`` rewrites the last four from ``results.jsonl``
(for instance after an interrupted run).
"""

from __future__ import annotations

import gc
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import optax
from absl import app, flags

import xent_jax
from research.bench import cases, ffi_kernel, report
from research.bench.cases import Group
from research.bench.timing import (
    Runner,
    device_peak_bytes,
    jax_runner,
    time_interleaved,
    torch_runner,
)
from research.common import cli
from research.common.config import ConfigError, check_config
from research.common.guard import progress
from research.common.workdir import to_jsonable

FLAGS = flags.FLAGS


def rules(config: Any) -> dict[str, tuple]:
    def shapes_ok(node) -> bool:
        for loss in cases.LOSSES:
            for text in node[loss]:
                shape = cases.parse_shape(text)
                if len(shape) != (3 if loss == "linear_softmax_int" else 2):
                    return False
        return True

    return {
        "losses": (lambda v: set(v) <= set(cases.LOSSES), f"a subset of {cases.LOSSES}"),
        "modes": (
            lambda v: len(v) > 0 and set(v) <= set(cases.MODES),
            f"a subset of {cases.MODES}",
        ),
        "dtypes": (
            lambda v: len(v) > 0 and set(v) <= set(cases.DTYPES),
            f"a subset of {tuple(cases.DTYPES)}",
        ),
        "implementations": (
            lambda v: set(v) <= set(cases.IMPLEMENTATIONS),
            f"a subset of {cases.IMPLEMENTATIONS}",
        ),
        "shapes": (shapes_ok, "NxK strings per softmax/sigmoid loss, NxDxV for the fused one"),
        "repeats": (lambda v: v >= 1, "at least 1"),
        "warmup": (lambda v: v >= 0, "at least 0"),
        "rotation_mib": (lambda v: v >= 0, "at least 0"),
        "max_inputs": (lambda v: v >= 2, "at least 2"),
        "memory_fraction": (lambda v: 0 < v <= 1, "in (0, 1]"),
        "fused_bars.shapes": (
            lambda v: all(len(cases.parse_shape(t)) == 3 for t in v),
            "NxDxV strings",
        ),
        "fused_bars.time": (
            lambda v: len(v) == len(config.fused_bars.shapes) and min(v, default=1) > 0,
            "one positive target per entry of fused_bars.shapes",
        ),
        "fused_bars.memory": (lambda v: 0 < v <= 1, "in (0, 1]"),
        "fused_bars.half_ignored": (lambda v: v > 0, "> 0"),
    }


def available_memory_bytes() -> int:
    """MemAvailable from /proc/meminfo (the physical memory elsewhere)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def memory_budget_bytes(fraction: float) -> float:
    """``fraction`` of the memory the inputs live in: the device's on a GPU/TPU, else the host's.

    With PyTorch on the same GPU, both frameworks allocate from the same device memory (JAX does
    not preallocate it in this script, see ``cli``).
    """
    limit = None
    if jax.default_backend() != "cpu":
        try:
            limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
        except Exception:
            limit = None
    return fraction * (limit or available_memory_bytes())


def queued_calls(group: Group, max_calls: int, spare_bytes: float) -> int:
    """Calls that may be queued back to back (accelerators): the device frees a call's output
    only once the call has run, so up to this many gradients (and temporaries of the logits'
    size) are alive at once; they must fit in the memory the group's inputs leave spare. With
    ``donate_logits`` each queued call holds a staged copy of the logits instead, which becomes
    its gradient, so the same count fits."""
    per_call = group.write_bytes("fwd_bwd") + group.elements * 4
    return int(max(1, min(max_calls, spare_bytes // max(per_call, 1))))


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def environment(config: Any, argv: list[str]) -> dict[str, Any]:
    devices = jax.devices()
    return {
        "type": "environment",
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join(["python -m research.benchmark", *argv]),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "optax": optax.__version__,
        "xent_jax": getattr(xent_jax, "__version__", "?"),
        "numpy": np.__version__,
        "torch": cases.torch_version(),
        "torch_device": cases.torch_device() if cases.torch_module() is not None else None,
        "backend": jax.default_backend(),
        "device_kind": devices[0].device_kind,
        "num_devices": len(devices),
        "cpu_count": os.cpu_count(),
        "memory_available_bytes": available_memory_bytes(),
        "load_average_start": load_average(),
        "XLA_FLAGS": os.environ.get("XLA_FLAGS"),
        "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES"),
        # A string: the report's tables print booleans as a passed / failed bar.
        "donate_logits": "on" if config.get("donate_logits", False) else "off",
        "ffi_kernel_sha256": (
            ffi_kernel.source_digest()
            if any(impl.startswith("ffi") for impl in config.implementations)
            else None
        ),
        "dtypes": list(config.dtypes),
        "shapes": {loss: list(config.shapes[loss]) for loss in config.losses},
        "config": config.to_dict(),
    }


def groups_of(config: Any) -> list[Group]:
    groups = []
    for loss in config.losses:
        for dtype in config.dtypes:
            for text in config.shapes[loss]:
                groups.append(Group(loss, dtype, cases.parse_shape(text)))
    return groups


def plan(group: Group, config: Any, backend: str) -> list[tuple[str, str | None]]:
    """(implementation, mode) pairs that exist for the group, then the reference kernels."""
    options = dict(config.options)
    planned = []
    for mode in config.modes:
        for impl in config.implementations:
            if impl == "torch":
                slow_matmul = group.linear and group.dtype == "bfloat16"
                if cases.torch_module() is not None and (
                    config.torch_bfloat16_matmul or not slow_matmul
                ):
                    planned.append((impl, mode))
            elif (
                cases.supports(group, impl)
                and cases.jax_loss(group.loss, impl, options) is not None
            ):
                planned.append((impl, mode))
    if config.reference_kernels:
        planned.extend((name, None) for name in cases.reference_kernels(group, backend))
    return planned


def build_runners(
    group: Group, planned, inputs, config: Any, backend: str, on_compile
) -> dict[str, Runner]:
    options = dict(config.options)
    refs = cases.reference_kernels(group, backend)
    torch_inputs: dict[str, list] = {}
    runners: dict[str, Runner] = {}
    # In place (config.donate_logits): the gradient, or the copy limit, may overwrite a fresh
    # copy of the logits, so no fresh output buffer is timed.
    in_place = config.get("donate_logits", False) and not group.linear
    for impl, mode in planned:
        donate = in_place and (impl == "(copy)" if mode is None else mode == "fwd_bwd")
        if mode is None:
            runner = jax_runner(impl, None, refs[impl], inputs, donate=donate)
        elif impl == "torch":
            if mode not in torch_inputs:
                torch_inputs[mode] = cases.torch_inputs(group, inputs, mode)
            runner = torch_runner(
                impl,
                mode,
                cases.torch_function(group, mode),
                torch_inputs[mode],
                cases.torch_synchronize(),
            )
        else:
            function = cases.jax_function(group, impl, mode, options, in_place=donate)
            if impl == "xent_jax[half-ignored]":
                ignore_index = options.get("ignore_index", -100)
                impl_inputs = cases.half_ignored_inputs(inputs, ignore_index, config.seed)
            else:
                impl_inputs = inputs
            runner = jax_runner(impl, mode, function, impl_inputs, donate=donate)
        runners[runner.key] = runner
        on_compile(runner)
    return runners


def bf16_accuracy(shape: tuple[int, ...], max_rows: int, seed: int) -> dict[str, Any]:
    """Max relative error of the bfloat16 loss against float64 on the same (upcast) logits."""
    n, k = min(shape[0], max_rows), shape[1]
    key_z, key_y = jax.random.split(jax.random.PRNGKey(seed + 1))
    logits = (2.0 * jax.random.normal(key_z, (n, k), jnp.float32)).astype(jnp.bfloat16)
    labels = jax.random.randint(key_y, (n,), 0, k, jnp.int32)
    up = np.asarray(logits.astype(jnp.float32), np.float64)
    row_max = up.max(-1, keepdims=True)
    lse = (row_max + np.log(np.exp(up - row_max).sum(-1, keepdims=True)))[:, 0]
    reference = lse - up[np.arange(n), np.asarray(labels)]
    ours = np.asarray(xent_jax.softmax_cross_entropy_with_integer_labels(logits, labels))
    theirs = np.asarray(
        optax.softmax_cross_entropy_with_integer_labels(logits, labels).astype(jnp.float32)
    )

    def err(x):
        return float(np.max(np.abs(np.asarray(x, np.float64) - reference) / np.abs(reference)))

    return {
        "shape": cases.shape_text((n, k)),
        "xent_jax_max_rel_error": err(ours),
        "optax_max_rel_error": err(theirs),
    }


def run(config: Any, workdir: str | Path, argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark described by ``config``; returns rows, bars, references, environment.

    ``argv`` (default ``sys.argv[1:]``) is recorded as the command in the results."""
    check_config(config, rules(config))
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    backend = jax.default_backend()
    env = environment(config, list(sys.argv[1:] if argv is None else argv))
    torch = cases.torch_module() if "torch" in config.implementations else None
    if torch is not None and config.torch_threads > 0:
        torch.set_num_threads(config.torch_threads)
    (workdir / "config.json").write_text(json.dumps(to_jsonable(config.to_dict()), indent=2))

    groups = groups_of(config)
    plans = {g: plan(g, config, backend) for g in groups}
    calls = sum(len(p) * (1 + config.warmup + config.repeats) for p in plans.values())
    rows: list[dict] = []
    refs: list[dict] = []
    skipped: list[dict] = []
    started = time.perf_counter()
    with (workdir / "results.jsonl").open("w") as log, progress(calls, "benchmark") as bar:

        def emit(record: dict) -> None:
            log.write(json.dumps(to_jsonable(record)) + "\n")
            log.flush()

        emit(env)
        for group in groups:
            planned = plans[group]
            count = cases.num_inputs(group, config.rotation_mib * 2**20, config.max_inputs)
            needed = group.working_set_bytes(count, torch is not None)
            budget = memory_budget_bytes(config.memory_fraction)
            if needed > budget:
                reason = f"needs ~{needed / 2**30:.1f} GiB, budget {budget / 2**30:.1f} GiB"
                skipped.append({"group": group.label, "reason": reason})
                emit({"type": "skipped", "group": group.label, "reason": reason})
                bar.update(len(planned) * (1 + config.warmup + config.repeats))
                continue
            bar.set_postfix_str(f"{group.label} (inputs)")
            inputs = cases.make_inputs(group, count, config.seed)

            def on_compile(runner, group=group):
                bar.set_postfix_str(f"{group.label} {runner.key}")
                bar.update(1)

            runners = build_runners(group, planned, inputs, config, backend, on_compile)
            bar.set_postfix_str(f"{group.label} (timing)")
            time_interleaved(
                list(runners.values()),
                repeats=config.repeats,
                warmup=config.warmup,
                seed=config.seed,
                batch_s=0.0 if backend == "cpu" else config.accelerator_batch_ms / 1e3,
                max_calls=queued_calls(group, config.max_calls_per_repeat, budget - needed),
                on_call=lambda: bar.update(1),
            )
            peak = device_peak_bytes()
            for row in report.group_rows(group, runners, backend):
                row["num_inputs"] = count
                if peak is not None:
                    row["device_peak_bytes"] = peak
                rows.append(row)
                emit({"type": "case", **row})
            for ref in report.reference_rows(group, runners):
                refs.append(ref)
                emit({"type": "reference", **ref})
            del inputs, runners
            gc.collect()

        accuracy = None
        bar_shape = config.bar_shape
        if "softmax_int" in config.losses and "bfloat16" in config.dtypes:
            accuracy = bf16_accuracy(
                cases.parse_shape(bar_shape), config.accuracy_rows, config.seed
            )
            emit({"type": "accuracy", **accuracy})
        bars = report.all_bars(rows, config.to_dict(), accuracy, backend)
        for entry in bars:
            emit({"type": "bar", **entry})
        env["load_average_end"] = load_average()
        env["elapsed_s"] = round(time.perf_counter() - started, 1)
        emit(
            {
                "type": "summary",
                "load_average_end": env["load_average_end"],
                "elapsed_s": env["elapsed_s"],
                "cases": len(rows),
                "skipped": len(skipped),
            }
        )

    write_outputs(workdir, env, rows, refs, bars, skipped, plots=config.plots)
    return {
        "rows": rows,
        "bars": bars,
        "references": refs,
        "environment": env,
        "skipped": skipped,
        "workdir": workdir,
    }


def write_outputs(workdir: Path, env, rows, refs, bars, skipped, *, plots: bool = True) -> None:
    """results.csv, results.md and the PNG plots from the collected records."""
    report.write_csv(workdir / "results.csv", rows)
    markdown = report.markdown_report(env, rows, refs, bars, skipped)
    (workdir / "results.md").write_text(markdown)
    if plots and rows:
        report.plot_time_vs_size(workdir / "time_vs_size.png", rows, refs)
        report.plot_fraction_of_limit(workdir / "fraction_of_limit.png", rows)


def rebuild(workdir: str | Path) -> dict[str, Any]:
    """Rewrites the CSV, Markdown and plots of a run from its results.jsonl (also of a run that
    was interrupted: every finished group is in the log)."""
    workdir = Path(workdir)
    records = [json.loads(line) for line in (workdir / "results.jsonl").read_text().splitlines()]
    strip = lambda r: {k: v for k, v in r.items() if k != "type"}
    env = records[0]
    rows = [strip(r) for r in records if r["type"] == "case"]
    refs = [strip(r) for r in records if r["type"] == "reference"]
    skipped = [strip(r) for r in records if r["type"] == "skipped"]
    accuracy = next((strip(r) for r in records if r["type"] == "accuracy"), None)
    summary = next((r for r in records if r["type"] == "summary"), None)
    if summary is None:
        env["load_average_end"] = "(interrupted run)"
    else:
        env["load_average_end"] = summary["load_average_end"]
    bars = report.all_bars(rows, env.get("config", {}), accuracy, env.get("backend", "cpu"))
    write_outputs(workdir, env, rows, refs, bars, skipped)
    return {"rows": rows, "bars": bars, "references": refs, "environment": env}


def print_bars(bars: list[dict], backend: str) -> None:
    """The bar lines on stdout: a missed bar that a CPU is not expected to meet is labelled so."""
    if not bars:
        return
    print(report.markdown_table(report.bar_lines(bars)))
    notes = {b["bar"]: b["cpu_not_expected"] for b in bars if b.get("cpu_not_expected")}
    if backend == "cpu" and notes:
        for bar, why in notes.items():
            print(f"* {bar}: CPU not expected: {why}.")
        print()


def main(argv: list[str]) -> None:
    """absl entry point: ``run`` on ``--config`` and ``--workdir`` (or ``--rebuild DIR``)."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    cli.quiet_logs()
    if FLAGS.rebuild:
        rebuild(FLAGS.rebuild)
        print(f"benchmark: outputs rebuilt in {FLAGS.rebuild}")
        return
    workdir = Path(FLAGS.workdir or Path("bench_runs") / time.strftime("%Y%m%d-%H%M%S"))
    try:
        result = run(FLAGS.config, workdir, sys.argv[1:])
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print_bars(result["bars"], result["environment"]["backend"])
    print(f"benchmark: results in {workdir}")


def define_flags() -> None:
    cli.define_flags("benchmark", workdir_help="output folder (default bench_runs/<timestamp>)")
    flags.DEFINE_string(
        "rebuild", None, "rewrite the CSV, Markdown and plots of this run folder from its jsonl"
    )


if __name__ == "__main__":
    # On a GPU, JAX would otherwise take 75% of the device memory at start-up, leaving PyTorch
    # (timed on the same device) too little; the memory guard reads the device's limit instead.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
