"""Run every research script on its default config: what ``make run`` calls.

    python -m research.run_all --runs_dir runs [--smoke] [--only name,name]

Each run goes to its own folder ``<runs_dir>/<timestamp>/`` (one subfolder per script, plus
``report.md`` and ``summary.json``); ``<runs_dir>/latest`` is a symlink to the newest run and
``<runs_dir>/report.md`` / ``summary.json`` are copies of its report (links adjusted), so
earlier runs are never overwritten. Exit status 1 if a script failed or a bar was missed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import jax

from research import (
    flax_classifier,
    gradcheck,
    logistic_regression,
    seed_examples,
    softmax_regression,
)
from research.common.config import CONFIG_DIR, load_config
from research.common.report import bars, render, summarize
from research.common.workdir import to_jsonable

SCRIPTS = {
    "logistic_regression": logistic_regression.main,
    "softmax_regression": softmax_regression.main,
    "flax_classifier": flax_classifier.main,
    "gradcheck": gradcheck.main,
    "seed_examples": seed_examples.main,
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
        config = load_config(f"{CONFIG_DIR / name}.py" + (":smoke" if smoke else ""))
        metrics = SCRIPTS[name](config, workdir)
        result = {"status": "ok", "summary": summarize(name, metrics), "bars": bars(name, metrics)}
    except Exception as error:  # one failing script must not stop the others
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "error.txt").write_text(traceback.format_exc())
        result = {"status": f"{type(error).__name__}: {error}", "summary": None, "bars": []}
        print(f"{name} FAILED: {result['status']}", file=sys.stderr)
    result["wall_time_s"] = time.perf_counter() - start
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs_dir", default="runs", type=Path)
    parser.add_argument("--smoke", action="store_true", help="use every config's :smoke variant")
    parser.add_argument(
        "--only", default=",".join(SCRIPTS), help=f"comma-separated subset of {','.join(SCRIPTS)}"
    )
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(names) - set(SCRIPTS))
    if unknown:
        parser.error(f"unknown script(s) in --only: {', '.join(unknown)}")

    run_dir = new_run_dir(args.runs_dir)
    start = time.perf_counter()
    results = {name: run_one(name, args.smoke, run_dir) for name in names}
    run = {
        "stamp": run_dir.name,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "wall_time_s": time.perf_counter() - start,
        "smoke": args.smoke,
        "jax_version": jax.__version__,
        "backend": jax.default_backend(),
        "devices": ", ".join(sorted({d.device_kind for d in jax.devices()})),
        "python": platform.python_version(),
    }
    all_bars = [row["met"] for r in results.values() for row in r["bars"]]
    summary = {
        "run": run,
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
    (run_dir / "report.md").write_text(render(run, results, run_dir))
    (args.runs_dir / "summary.json").write_text(text)
    (args.runs_dir / "report.md").write_text(
        render(run, results, run_dir, prefix=f"{run_dir.name}/")
    )
    point_latest(args.runs_dir, run_dir)
    for row in summary["bars"]:
        print(
            f"{'ok  ' if row['met'] else 'MISS'} {row['check']}: {row['measured']} "
            f"(bar {row['bar']})"
        )
    print(
        f"report: {run_dir / 'report.md'} ({run['wall_time_s']:.0f} s); "
        f"all bars met: {summary['all_bars_met']}"
    )
    return 0 if summary["all_bars_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
