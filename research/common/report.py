"""summary.json and the one-page report.md of a ``research.run_all`` run.

The report opens with what the run shows (one clause per script, with its figures), the seed
articles by title and the library's headline claims as measured rows, then every bar, one
section per script, and ends with a conclusion computed from the bars and the scripts' status.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from research.common.workdir import markdown_table

# The three articles the project grew from (the third one's copy has no title: its main heading).
SEED_ARTICLES = (
    "“Understanding Cross Entropy Loss”",
    "“Do you want to learn AI, learn Cross-Entropy First?” (Mahesh Pardeshi, 2019)",
    "“Cross-Entropy Loss Function - How it Adjusts Weights” (the main heading of the third "
    "article, whose copy carries no title: softmax, the car / bike / plane / boat example, "
    "three containers of cubes and spheres)",
)

TITLES = {
    "logistic_regression": "1. Logistic regression (breast cancer) vs scikit-learn",
    "softmax_regression": "2. Softmax regression (iris, digits) vs scikit-learn",
    "flax_classifier": "3. Flax NNX classifiers on digits",
    "gradcheck": "4. Gradient check: autodiff vs closed forms",
    "seed_examples": "5. Seed articles: worked examples and figures",
    "headline_claims": "Headline claims (measured in this run)",
    "language_model": "6. A language model trained with the fused, sharded loss",
}
LANGUAGE_MODEL_KEYS = (
    "test_bits_per_byte",
    "validation_bits_per_byte",
    "zlib_bits_per_byte",
    "bz2_bits_per_byte",
    "lzma_bits_per_byte",
    "unigram_bits_per_byte",
    "beats_lzma",
    "fused_step_temp_bytes",
    "materialised_step_temp_bytes",
    "memory_ratio",
    "fused_step_seconds",
    "materialised_step_seconds",
    "vocab_size",
    "parameters",
    "steps",
    "tokens_trained",
    "tokens_per_second",
    "resume_exact",
    "mesh",
    "seconds",
)
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
    if name == "headline_claims":
        keep = ("claim", "setting", "value", "measured", "bar", "met")
        return {
            "all_bars_met": metrics["all_bars_met"],
            "claims": [{k: row[k] for k in keep} for row in metrics["claims"]],
            "fused_memory": metrics["fused_memory"],
            "sharded": metrics["sharded"],
            "bfloat16": metrics["bfloat16"],
        }
    if name == "language_model":
        return {k: metrics[k] for k in LANGUAGE_MODEL_KEYS}
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
    elif name == "headline_claims":
        for row in metrics["claims"]:
            rows.append(
                {
                    "check": f"claim: {row['claim']}",
                    "bar": row["bar"],
                    "measured": row["measured"],
                    "met": row["met"],
                }
            )
    elif name == "language_model":
        rows.extend(metrics["checks"])
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


def _solver_gap(solvers: dict[str, Any]) -> float:
    """The largest |rel_gap| of the solvers held to the bar (lbfgs, newton)."""
    return max(abs(solvers[s]["rel_gap"]) for s in ("lbfgs", "newton") if s in solvers)


def _finding_logistic(summary: dict[str, Any]) -> str:
    return (
        "L-BFGS and Newton on xent_jax's sigmoid cross-entropy reach scikit-learn's "
        f"logistic-regression objective on breast-cancer data (largest relative gap "
        f"{_solver_gap(summary):.1e})"
    )


def _finding_softmax(summary: dict[str, Any]) -> str:
    gap = max(_solver_gap(entry["solvers"]) for entry in summary.values())
    return (
        "multinomial regressions with the integer-label softmax loss reach scikit-learn's "
        f"objective on {' and '.join(summary)} (largest gap {gap:.1e})"
    )


def _finding_flax(summary: dict[str, Any]) -> str:
    accuracy = {model: entry["test_accuracy"] for model, entry in summary.items()}
    shown = ", ".join(f"{model} {value:.1%}" for model, value in accuracy.items())
    return f"Flax NNX classifiers trained with the losses reach {shown} test accuracy on digits"


def _finding_gradcheck(summary: dict[str, Any]) -> str:
    parts = [
        f"{summary[f'max_rel_error_{dtype}']:.0e} in {dtype}"
        for dtype in ("float64", "float32")
        if summary.get(f"max_rel_error_{dtype}") is not None
    ]
    return (
        "jax.grad and jax.hessian of every loss agree with the closed forms to "
        f"{' and '.join(parts)} (finite differences where there is no closed form: "
        f"{summary['max_rel_error_finite_difference']:.0e})"
    )


def _finding_seeds(summary: dict[str, Any]) -> str:
    verdict = "all" if summary["all_match"] else "not all"
    return (
        f"{verdict} of the seed articles' {summary['cases']} worked examples are reproduced "
        f"({summary['checks']} checks, in bits and nats)"
    )


def _finding_claims(summary: dict[str, Any]) -> str:
    sharded = max(
        max(case.values()) for case in (summary["sharded"][k] for k in ("fused", "logits"))
    )
    bf16 = summary["bfloat16"]
    return (
        f"the fused loss takes {summary['fused_memory']['ratio']:.3f} of the temporary memory "
        f"of materialising the logits, vocab-sharded values and gradients equal one device's to "
        f"{sharded:.0e} on {summary['sharded']['device_count']} devices, and bfloat16 inputs stay "
        f"within {max(bf16['plain_xent_jax'], bf16['fused_xent_jax']):.0e} of a float64 "
        f"reference (optax: {bf16['plain_optax']:.0e})"
    )


def _finding_language_model(summary: dict[str, Any]) -> str:
    return (
        f"a {summary['parameters']:,}-parameter transformer trained with the fused loss "
        f"(V={summary['vocab_size']}, {summary['tokens_trained']:,} tokens) reaches "
        f"{summary['test_bits_per_byte']:.3f} bits per byte on held-out standard-library files "
        f"(zlib -9 {summary['zlib_bits_per_byte']:.3f}, xz -9 "
        f"{summary['lzma_bits_per_byte']:.3f}, unigram {summary['unigram_bits_per_byte']:.3f}), "
        f"its train step needs {summary['memory_ratio']:.2f} of the materialised loss's "
        f"temporary memory, and a resumed run repeats the losses "
        f"{'exactly' if summary['resume_exact'] else 'NOT exactly'}"
    )


FINDINGS: dict[str, Callable[[dict[str, Any]], str]] = {
    "logistic_regression": _finding_logistic,
    "softmax_regression": _finding_softmax,
    "flax_classifier": _finding_flax,
    "gradcheck": _finding_gradcheck,
    "seed_examples": _finding_seeds,
    "headline_claims": _finding_claims,
    "language_model": _finding_language_model,
}


def _bar_count(result: dict[str, Any]) -> tuple[int, int]:
    bars = result.get("bars", [])
    return sum(bool(b["met"]) for b in bars), len(bars)


def finding(name: str, result: dict[str, Any]) -> str:
    """One clause saying what a script showed in this run, with its figures."""
    if result["status"] != "ok":
        return f"{name} failed ({result['status']})"
    met, total = _bar_count(result)
    try:
        return FINDINGS[name](result["summary"])
    except (KeyError, TypeError, ValueError):  # a script without a sentence of its own
        return f"{TITLES.get(name, name)}: {met} of {total} bars met"


def opening(run: dict[str, Any], results: dict[str, dict[str, Any]]) -> str:
    """The opening paragraph: what this run shows, from its results."""
    clauses = [finding(name, result) for name, result in results.items()]
    body = "; ".join(clauses)
    return (
        f"This run checks xent_jax against independent references on "
        f"{'the small smoke' if run['smoke'] else 'the default'} configs, "
        f"{run['backend']} backend. What it shows: {body}. The worked examples come from the "
        "three seed articles: " + "; ".join(SEED_ARTICLES) + "."
    )


def conclusion(run: dict[str, Any], results: dict[str, dict[str, Any]]) -> str:
    """The closing paragraph, computed from the bars and the scripts' status."""
    bars = [row for r in results.values() for row in r.get("bars", [])]
    met = sum(bool(b["met"]) for b in bars)
    failed = [n for n, r in results.items() if r["status"] != "ok"]
    missed = [b for b in bars if not b["met"]]
    text = (
        f"{met} of {len(bars)} bars met by {len(results) - len(failed)} of {len(results)} "
        f"scripts in {run['wall_time_s']:.0f} s."
    )
    if not failed and not missed and bars:
        text += (
            " Every check of this run holds: on these data and settings the losses, their "
            "derivatives and the headline claims agree with the references within the stated "
            "bars."
        )
    if missed:
        shown = "; ".join(f"{b['check']} ({b['measured']}, bar {b['bar']})" for b in missed)
        text += f" Missed: {shown}."
    if failed:
        text += f" Failed: {', '.join(failed)} (their error.txt has the traceback)."
    if run["smoke"]:
        text += " Smoke configs are small: the default configs (`make run`) are the run of record."
    return text


def _section(
    name: str, result: dict[str, Any], run: dict[str, Any], run_dir: Path, prefix: str
) -> list[str]:
    folder = f"{prefix}{name}"
    lines = [f"## {TITLES.get(name, name)}", ""]
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
    return lines


def render(
    run: dict[str, Any], results: dict[str, dict[str, Any]], run_dir: Path, prefix: str = ""
) -> str:
    """report.md; ``prefix`` is prepended to every link (for a copy outside the run folder).

    Order: what the run shows, the headline claims, every bar, one section per script, the
    conclusion."""
    all_bars = [row for r in results.values() for row in r.get("bars", [])]
    lines = [
        f"# xent_jax research report — {run['stamp']}",
        "",
        f"{run['started']} · {run['wall_time_s']:.0f} s · JAX {run['jax_version']} on "
        f"{run['backend']} ({run['devices']}) · configs: "
        f"{'smoke' if run['smoke'] else 'default'} · [summary.json]({prefix}summary.json)",
        "",
        opening(run, results),
        "",
    ]
    first = [name for name in results if name == "headline_claims"]
    for name in first:
        lines += _section(name, results[name], run, run_dir, prefix)
    lines += [
        "## Bars",
        "",
        markdown_table(all_bars, ["check", "bar", "measured", "met"]) if all_bars else "",
    ]
    failed = [n for n, r in results.items() if r["status"] != "ok"]
    if failed:
        lines += [f"**Scripts that failed:** {', '.join(failed)} (see below).", ""]
    for name, result in results.items():
        if name not in first:
            lines += _section(name, result, run, run_dir, prefix)
    lines += ["## Conclusion", "", conclusion(run, results)]
    return "\n".join(lines) + "\n"
