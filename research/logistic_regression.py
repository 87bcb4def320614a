"""Binary logistic regression with ``xent_jax.sigmoid_binary_cross_entropy`` + L2.

Breast-cancer data (standardised, fixed stratified split), fitted with an Optax first-order
optimiser, ``optax.lbfgs`` and Newton's method (``jax.hessian``), and compared with
``sklearn.linear_model.LogisticRegression`` on the same objective
``sum_i logloss_i + ||w||^2 / (2C)``.

    python -m research.logistic_regression --config configs/logistic_regression.py[:smoke] \
        [--config.KEY=VALUE ...] --workdir DIR
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import matplotlib.pyplot as plt
from absl import app

from research.common import Workdir, check_config, cli, markdown_table
from research.common.data import load_split
from research.common.linear import plot_convergence
from research.common.problem import FORMATS, TABLE_COLUMNS, regression_rules, run_dataset
from research.common.problem import table_rows as to_table_rows

DATASET = "breast_cancer"


def run(config: Any, workdir: str | Path) -> dict[str, Any]:
    """Run the comparison; writes config.json, metrics.jsonl, metrics.json, tables.md and
    convergence.png to ``workdir`` and returns the metrics."""
    check_config(config, regression_rules(config))
    out = Workdir(workdir)
    out.write_config(config)
    with jax.enable_x64(True):
        split = load_split(DATASET, test_size=config.test_size, seed=config.seed)
        rows, fits = run_dataset(split, 2, config, out, tag="")
    bar_rows = [r for r in rows.values() if r["meets_bar"] is not None]
    metrics = {
        "dataset": DATASET,
        "n_train": int(split.x_train.shape[0]),
        "n_test": int(split.x_test.shape[0]),
        "n_features": int(split.x_train.shape[1]),
        "C": config.C,
        "bar": config.bar,
        "all_bars_met": all(r["meets_bar"] for r in bar_rows),
        "solvers": rows,
    }
    out.write_metrics(metrics)

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    plot_convergence(
        ax,
        fits,
        rows["sklearn"]["objective_numpy"],
        config.bar,
        f"Logistic regression, {DATASET} (C={config.C:g})",
    )
    out.save_figure(fig, "convergence.png")
    table = markdown_table(to_table_rows(rows), TABLE_COLUMNS, formats=FORMATS)
    out.write_text(
        "tables.md",
        f"Data: {DATASET}, {metrics['n_train']} train / {metrics['n_test']} test examples, "
        f"{metrics['n_features']} standardised features; objective "
        f"sum(logloss) + ||w||^2/(2C), C={config.C:g}. rel_gap = (objective - sklearn) / "
        "|sklearn|, both evaluated by an independent NumPy formula; xent_vs_numpy_rel compares "
        f"xent_jax's objective with it. Bar: |rel_gap| <= {config.bar:g} for lbfgs and "
        "newton. Wall times exclude JIT compilation.\n\n" + table,
    )
    return metrics


def main(argv: list[str]) -> None:
    """absl entry point: ``run`` on ``--config`` and ``--workdir``."""
    cli.run_main(argv, run, "logistic_regression")


if __name__ == "__main__":
    cli.define_flags("logistic_regression")
    app.run(main, flags_parser=cli.parse_flags)
