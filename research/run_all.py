"""Run every research script on its default config: what ``make run`` calls.

    python -m research.run_all --runs_dir runs [--smoke] [--only name,name]

Each script's config is ``configs/<name>.py`` (its ``:smoke`` variant with ``--smoke``), loaded
by importing the module and calling ``get_config``, as ``--config`` would.

Each run goes to its own folder ``<runs_dir>/<timestamp>/`` (one subfolder per script, plus
``report.md`` and ``summary.json``); ``<runs_dir>/latest`` is a symlink to the newest run and
``<runs_dir>/report.md`` / ``summary.json`` are copies of its report (links adjusted), so
earlier runs are never overwritten. Exit status 1 if a script failed or a bar was missed.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import jax
from absl import app, flags

from research import (
    flax_classifier,
    gradcheck,
    headline_claims,
    language_model,
    logistic_regression,
    seed_examples,
    softmax_regression,
)
from research.common import cli
from research.common.config import get_config
from research.common.report import bars, render, summarize
from research.common.workdir import to_jsonable

FLAGS = flags.FLAGS
SCRIPTS = {
    "logistic_regression": logistic_regression.run,
    "softmax_regression": softmax_regression.run,
    "flax_classifier": flax_classifier.run,
    "gradcheck": gradcheck.run,
    "seed_examples": seed_examples.run,
    "headline_claims": headline_claims.run,
    "language_model": language_model.run,
}


def new_run_dir(runs_dir: Path) -> Path:
    """``runs_dir/<YYYYmmdd-HHMMSS>``, with a suffix if that folder already exists."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, n = runs_dir / stamp, 1
    while path.exists():
        path, n = runs_dir / f"{stamp}-{n}", n + 1
    path.mkdir(parents=True)
    return path


def point_latest(runs_dir: Path, run_dir: Path) -> None:
    """Atomically make ``runs_dir/latest`` a relative symlink to ``run_dir``."""
    latest = runs_dir / "latest"
    if latest.exists() and not latest.is_symlink():
        print(f"warning: {latest} is not a symlink; left as it is", file=sys.stderr)
        return
    tmp = runs_dir / f".latest-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(run_dir.name, target_is_directory=True)
    os.replace(tmp, latest)


def run_one(name: str, smoke: bool, run_dir: Path) -> dict[str, Any]:
    workdir = run_dir / name
    start = time.perf_counter()
    print(f"== {name} ==", file=sys.stderr, flush=True)
    try:
        config = get_config(name, "smoke" if smoke else None)
        metrics = SCRIPTS[name](config, workdir)
        result = {"status": "ok", "summary": summarize(name, metrics), "bars": bars(name, metrics)}
    except Exception as error:  # one failing script must not stop the others
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "error.txt").write_text(traceback.format_exc())
        result = {"status": f"{type(error).__name__}: {error}", "summary": None, "bars": []}
        print(f"{name} FAILED: {result['status']}", file=sys.stderr)
    result["wall_time_s"] = time.perf_counter() - start
    return result


def run(runs_dir: str | Path, *, smoke: bool = False, only: list[str] | None = None) -> int:
    """Runs the scripts named in ``only`` (default: all) into a new folder of ``runs_dir``;
    returns the exit status (1 if a script failed or a bar was missed)."""
    runs_dir = Path(runs_dir)
    names = list(SCRIPTS) if only is None else [n.strip() for n in only if n.strip()]
    unknown = sorted(set(names) - set(SCRIPTS))
    if unknown:
        raise ValueError(
            f"unknown script(s) in --only: {', '.join(unknown)}; choose from {', '.join(SCRIPTS)}"
        )

    run_dir = new_run_dir(runs_dir)
    start = time.perf_counter()
    results = {name: run_one(name, smoke, run_dir) for name in names}
    info = {
        "stamp": run_dir.name,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "wall_time_s": time.perf_counter() - start,
        "smoke": smoke,
        "jax_version": jax.__version__,
        "backend": jax.default_backend(),
        "devices": ", ".join(sorted({d.device_kind for d in jax.devices()})),
        "python": platform.python_version(),
    }
    all_bars = [row["met"] for r in results.values() for row in r["bars"]]
    summary = {
        "run": info,
        **{name: r["summary"] for name, r in results.items()},
        "scripts": {
            name: {"status": r["status"], "wall_time_s": r["wall_time_s"]}
            for name, r in results.items()
        },
        "bars": [row for r in results.values() for row in r["bars"]],
        "all_bars_met": bool(all_bars)
        and all(all_bars)
        and all(r["status"] == "ok" for r in results.values()),
    }
    text = json.dumps(to_jsonable(summary), indent=2) + "\n"
    (run_dir / "summary.json").write_text(text)
    (run_dir / "report.md").write_text(render(info, results, run_dir))
    (runs_dir / "summary.json").write_text(text)
    (runs_dir / "report.md").write_text(render(info, results, run_dir, prefix=f"{run_dir.name}/"))
    point_latest(runs_dir, run_dir)
    for row in summary["bars"]:
        print(
            f"{'ok  ' if row['met'] else 'MISS'} {row['check']}: {row['measured']} "
            f"(bar {row['bar']})"
        )
    print(
        f"report: {run_dir / 'report.md'} ({info['wall_time_s']:.0f} s); "
        f"all bars met: {summary['all_bars_met']}"
    )
    return 0 if summary["all_bars_met"] else 1


def main(argv: list[str]) -> None:
    """absl entry point: ``run`` on ``--runs_dir``, ``--smoke`` and ``--only``."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    cli.quiet_logs()
    try:
        status = run(FLAGS.runs_dir, smoke=FLAGS.smoke, only=FLAGS.only)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    sys.exit(status)


def define_flags() -> None:
    flags.DEFINE_string("runs_dir", "runs", "folder of the runs (one subfolder per run)")
    flags.DEFINE_bool("smoke", False, "use every config's :smoke variant")
    flags.DEFINE_list("only", list(SCRIPTS), f"a subset of {','.join(SCRIPTS)}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
