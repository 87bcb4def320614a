"""summary.json and the one-page report.md of a ``research.run_all`` run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from research.common.workdir import markdown_table

TITLES = {
    "logistic_regression": "1. Logistic regression (breast cancer) vs scikit-learn",
    "softmax_regression": "2. Softmax regression (iris, digits) vs scikit-learn",
    "flax_classifier": "3. Flax NNX classifiers on digits",
    "gradcheck": "4. Gradient check: autodiff vs closed forms",
    "seed_examples": "5. Seed articles: worked examples and figures",
}
REGRESSION_KEYS = (
    "objective",
    "sklearn_objective",
    "rel_gap",
    "test_accuracy",
    "sklearn_test_accuracy",
    "coef_max_abs_diff",
    "iterations",
    "wall_time_s",
)


def _pick(row: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: row[k] for k in keys if k in row}


def summarize(name: str, metrics: dict[str, Any]) -> dict[str, Any]:
    """The part of summary.json for one script."""
    if name == "logistic_regression":
        return {s: _pick(r, REGRESSION_KEYS) for s, r in metrics["solvers"].items()}
    if name == "softmax_regression":
        return {
            d: {
                **_pick(r, REGRESSION_KEYS),
                "solver": r["solver"],
                "solvers": {s: _pick(x, REGRESSION_KEYS) for s, x in r["solvers"].items()},
            }
            for d, r in metrics["datasets"].items()
        }
    if name == "flax_classifier":
        return {
            m: {k: v for k, v in r.items() if k != "curves"} for m, r in metrics["models"].items()
        }
    if name == "gradcheck":
        return {k: v for k, v in metrics.items() if k != "failures"}
    if name == "seed_examples":
        return {k: metrics[k] for k in ("all_match", "cases", "checks")}
    return metrics


def bars(name: str, metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's bars for one script: check, bar, measured, met."""
    rows = []
    if name in ("logistic_regression", "softmax_regression"):
        groups = (
            {"logistic": metrics["solvers"]}
            if name == "logistic_regression"
            else {f"softmax {d}": res["solvers"] for d, res in metrics["datasets"].items()}
        )
        for group, solvers in groups.items():
            for s, r in solvers.items():
                if r["meets_bar"] is not None:
                    rows.append(
                        {
                            "check": f"{group} {s}: objective vs sklearn's (rel_gap)",
                            "bar": f"|rel_gap| <= {metrics['bar']:g}",
                            "measured": f"{r['rel_gap']:.2e}",
                            "met": r["meets_bar"],
                        }
                    )
    elif name == "flax_classifier":
        for m, r in metrics["models"].items():
            rows.append(
                {
                    "check": f"flax {m}: test accuracy",
                    "bar": f">= {metrics['bar']:g}",
                    "measured": f"{r['test_accuracy']:.4f}",
                    "met": r["meets_bar"],
                }
            )
    elif name == "gradcheck":
        for dtype, tol in metrics["tolerances"].items():
            value = metrics.get(f"max_rel_error_{dtype}")
            if value is not None:
                rows.append(
                    {
                        "check": f"gradcheck {dtype}: max rel error (grad, hessian)",
                        "bar": f"<= {tol:g}",
                        "measured": f"{value:.1e}",
                        "met": value <= tol,
                    }
                )
        value = metrics["max_rel_error_finite_difference"]
        rows.append(
            {
                "check": "gradcheck: losses without closed form vs finite differences",
                "bar": f"<= {metrics['fd_tolerance']:g}",
                "measured": f"{value:.1e}",
                "met": value <= metrics["fd_tolerance"],
            }
        )
    elif name == "seed_examples":
        rows.append(
            {
                "check": "seed examples: every worked example reproduced",
                "bar": "all match",
                "measured": f"{metrics['checks']} checks, {metrics['cases']} examples",
                "met": metrics["all_match"],
            }
        )
    return rows


def render(
    run: dict[str, Any], results: dict[str, dict[str, Any]], run_dir: Path, prefix: str = ""
) -> str:
    """report.md; ``prefix`` is prepended to every link (for a copy outside the run folder)."""
    all_bars = [row for r in results.values() for row in r.get("bars", [])]
    lines = [
        f"# xent_jax research report — {run['stamp']}",
        "",
        f"{run['started']} · {run['wall_time_s']:.0f} s · JAX {run['jax_version']} on "
        f"{run['backend']} ({run['devices']}) · configs: "
        f"{'smoke' if run['smoke'] else 'default'} · [summary.json]({prefix}summary.json)",
        "",
        "## Bars",
        "",
        markdown_table(all_bars, ["check", "bar", "measured", "met"]) if all_bars else "",
    ]
    failed = [n for n, r in results.items() if r["status"] != "ok"]
    if failed:
        lines += [f"**Scripts that failed:** {', '.join(failed)} (see below).", ""]
    for name, result in results.items():
        folder = f"{prefix}{name}"
        lines += [f"## {TITLES.get(name, name)}", ""]
        lines += [
            f"`python -m research.{name} --config configs/{name}.py"
            f"{':smoke' if run['smoke'] else ''}` · {result['wall_time_s']:.1f} s · "
            f"[config.json]({folder}/config.json) · [metrics.json]({folder}/metrics.json) "
            f"· [metrics.jsonl]({folder}/metrics.jsonl)",
            "",
        ]
        if result["status"] != "ok":
            lines += [f"**FAILED**: `{result['status']}` — [error.txt]({folder}/error.txt)", ""]
        tables = run_dir / name / "tables.md"
        if tables.exists():
            lines += [tables.read_text().strip(), ""]
        for png in sorted((run_dir / name).glob("*.png")):
            lines += [f"![{name}: {png.stem}]({folder}/{png.name})", ""]
    return "\n".join(lines) + "\n"
