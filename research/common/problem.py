"""An L2-regularised logistic / softmax regression problem and its scikit-learn comparison.

The loss inside the fits is xent_jax's; the objectives that are compared (ours and
scikit-learn's) are evaluated by an independent float64 NumPy/SciPy formula, and the two
evaluations are checked against each other.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Any

import jax.numpy as jnp
import numpy as np
from scipy.special import log_expit, logsumexp
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

import xent_jax
from research.common.data import Split
from research.common.linear import Fit, fit_first_order, fit_lbfgs, fit_newton, relative_gap
from research.common.workdir import Workdir


@dataclass
class LinearProblem:
    """``logits = x @ W + b``; binary problems have one output column."""

    split: Split
    C: float
    num_classes: int

    @property
    def outputs(self) -> int:
        return 1 if self.num_classes == 2 else self.num_classes

    @property
    def dim(self) -> int:
        return self.split.x_train.shape[1]

    def unravel(self, theta):
        k = self.outputs
        return theta[: self.dim * k].reshape(self.dim, k), theta[self.dim * k :]

    def theta0(self) -> jnp.ndarray:
        return jnp.zeros(self.dim * self.outputs + self.outputs, dtype=jnp.float64)

    def objective(self, theta):
        """xent_jax loss (sum over examples) + ||W||^2 / (2C); traced by the solvers."""
        w, b = self.unravel(theta)
        logits = jnp.asarray(self.split.x_train) @ w + b
        labels = jnp.asarray(self.split.y_train)
        if self.outputs == 1:
            loss = xent_jax.sigmoid_binary_cross_entropy(
                logits[:, 0], labels.astype(logits.dtype), reduction="sum"
            )
        else:
            loss = xent_jax.softmax_cross_entropy_with_integer_labels(
                logits, labels, reduction="sum"
            )
        return loss + jnp.sum(w * w) / (2.0 * self.C)

    def objective_numpy(self, theta: np.ndarray) -> float:
        """Independent reference: scikit-learn's objective written with NumPy / SciPy."""
        w, b = self.unravel(np.asarray(theta, dtype=np.float64))
        z = self.split.x_train @ w + b
        y = self.split.y_train
        if self.outputs == 1:
            z = z[:, 0]
            loss = -np.sum(y * log_expit(z) + (1 - y) * log_expit(-z))
        else:
            loss = np.sum(logsumexp(z, axis=1) - z[np.arange(len(y)), y])
        return float(loss + np.sum(w * w) / (2.0 * self.C))

    def accuracy(self, theta: np.ndarray) -> float:
        w, b = self.unravel(np.asarray(theta))
        z = self.split.x_test @ w + b
        pred = (z[:, 0] > 0).astype(int) if self.outputs == 1 else z.argmax(axis=1)
        return float(np.mean(pred == self.split.y_test))

    def theta_from_sklearn(self, clf: LogisticRegression) -> np.ndarray:
        return np.concatenate([clf.coef_.T.reshape(-1), clf.intercept_])

    def coef_diff(self, theta: np.ndarray, other: np.ndarray) -> float:
        """Max abs difference of W and of the centred intercepts (softmax intercepts are only
        defined up to a common shift)."""
        w1, b1 = self.unravel(np.asarray(theta))
        w2, b2 = self.unravel(np.asarray(other))
        if self.outputs > 1:
            b1, b2 = b1 - b1.mean(), b2 - b2.mean()
        return float(max(np.abs(w1 - w2).max(), np.abs(b1 - b2).max()))


def fit_sklearn(problem: LinearProblem, config: Any) -> tuple[LogisticRegression, float, int]:
    clf = LogisticRegression(
        C=problem.C,
        tol=config.sklearn_tol,
        max_iter=config.sklearn_max_iter,
        solver=config.sklearn_solver,
    )
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(problem.split.x_train, problem.split.y_train)
    return clf, time.perf_counter() - start, int(np.max(clf.n_iter_))


def solve_all(problem: LinearProblem, config: Any, log: Workdir, tag: str) -> dict[str, Fit]:
    """The three solvers named in ``config.solvers``."""
    fits = {}
    theta0 = problem.theta0()
    n = problem.split.x_train.shape[0]
    for solver in config.solvers:
        name = f"{tag}/{solver}" if tag else solver
        if solver == "lbfgs":
            fits[solver] = fit_lbfgs(
                problem.objective,
                theta0,
                max_iter=config.lbfgs_max_iter,
                tol=config.tol,
                log=log,
                log_every=config.log_every,
                name=name,
            )
        elif solver == "newton":
            fits[solver] = fit_newton(
                problem.objective,
                theta0,
                max_iter=config.newton_max_iter,
                tol=config.tol,
                log=log,
                name=name,
            )
        else:
            fits[solver] = fit_first_order(
                problem.objective,
                theta0,
                n,
                optimizer=config.optimizer,
                learning_rate=config.learning_rate,
                schedule=config.schedule,
                steps=config.steps,
                log=log,
                log_every=config.log_every,
                name=name,
            )
    return fits


def compare(
    problem: LinearProblem,
    fits: dict[str, Fit],
    clf: LogisticRegression,
    sk_time: float,
    sk_iters: int,
    bar: float,
) -> dict[str, dict[str, Any]]:
    """One row per solver (plus scikit-learn's own), objectives evaluated independently."""
    theta_sk = problem.theta_from_sklearn(clf)
    sk_objective = problem.objective_numpy(theta_sk)
    sk_accuracy = problem.accuracy(theta_sk)
    rows = {}
    for solver, fit in fits.items():
        numpy_objective = problem.objective_numpy(fit.theta)
        gap = relative_gap(numpy_objective, sk_objective)
        rows[solver] = {
            "objective": fit.objective,
            "objective_numpy": numpy_objective,
            "xent_vs_numpy_rel": abs(fit.objective - numpy_objective) / abs(numpy_objective),
            "sklearn_objective": sk_objective,
            "rel_gap": gap,
            "coef_max_abs_diff": problem.coef_diff(fit.theta, theta_sk),
            "test_accuracy": problem.accuracy(fit.theta),
            "sklearn_test_accuracy": sk_accuracy,
            "iterations": fit.iterations,
            "wall_time_s": fit.wall_time_s,
            "meets_bar": abs(gap) <= bar if solver in ("lbfgs", "newton") else None,
        }
    xent_at_sk = float(problem.objective(jnp.asarray(theta_sk)))
    rows["sklearn"] = {
        "objective": xent_at_sk,
        "objective_numpy": sk_objective,
        "xent_vs_numpy_rel": abs(xent_at_sk - sk_objective) / abs(sk_objective),
        "sklearn_objective": sk_objective,
        "rel_gap": 0.0,
        "coef_max_abs_diff": 0.0,
        "test_accuracy": sk_accuracy,
        "sklearn_test_accuracy": sk_accuracy,
        "iterations": sk_iters,
        "wall_time_s": sk_time,
        "meets_bar": None,
    }
    return rows


TABLE_COLUMNS = [
    "solver",
    "objective",
    "sklearn_objective",
    "rel_gap",
    "coef_max_abs_diff",
    "xent_vs_numpy_rel",
    "test_accuracy",
    "sklearn_test_accuracy",
    "iterations",
    "wall_time_s",
    "meets_bar",
]


def table_rows(rows: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for solver, row in rows.items():
        row = dict(row, solver=solver)
        row["meets_bar"] = "n/a" if row["meets_bar"] is None else row["meets_bar"]
        out.append(row)
    return out


def regression_rules(config: Any) -> dict[str, tuple]:
    """Value checks shared by the logistic and softmax regression configs."""
    import optax

    solver_names = {"lbfgs", "newton", config.get("optimizer")}
    return {
        "seed": (lambda v: isinstance(v, int) and v >= 0, "an int >= 0"),
        "test_size": (lambda v: 0.0 < v < 1.0, "a fraction in (0, 1)"),
        "C": (lambda v: v > 0, "must be > 0"),
        "optimizer": (lambda v: callable(getattr(optax, v, None)), "an optax optimiser name"),
        "solvers": (
            lambda v: len(v) > 0 and set(v) <= solver_names,
            f"a non-empty subset of {sorted(map(str, solver_names))}",
        ),
        "learning_rate": (lambda v: v > 0, "must be > 0"),
        "schedule": (lambda v: v in ("constant", "cosine"), "'constant' or 'cosine'"),
        "steps": (lambda v: v >= 1, "must be >= 1"),
        "tol": (lambda v: v > 0, "must be > 0"),
        "lbfgs_max_iter": (lambda v: v >= 1, "must be >= 1"),
        "newton_max_iter": (lambda v: v >= 1, "must be >= 1"),
        "sklearn_solver": (
            lambda v: v in ("lbfgs", "newton-cg", "newton-cholesky", "sag", "saga"),
            "a scikit-learn solver supporting L2: lbfgs, newton-cg, newton-cholesky, sag, saga",
        ),
        "sklearn_tol": (lambda v: v > 0, "must be > 0"),
        "sklearn_max_iter": (lambda v: v >= 1, "must be >= 1"),
        "bar": (lambda v: v > 0, "must be > 0"),
        "log_every": (lambda v: v >= 1, "must be >= 1"),
    }


def run_dataset(split: Split, num_classes: int, config: Any, log: Workdir, tag: str):
    """Fit scikit-learn and our solvers on one data set; returns (rows, fits)."""
    problem = LinearProblem(split, config.C, num_classes)
    clf, sk_time, sk_iters = fit_sklearn(problem, config)
    fits = solve_all(problem, config, log, tag)
    rows = compare(problem, fits, clf, sk_time, sk_iters, config.bar)
    return rows, fits


FORMATS = {
    "objective": ".12g",
    "sklearn_objective": ".12g",
    "rel_gap": ".2e",
    "coef_max_abs_diff": ".2e",
    "xent_vs_numpy_rel": ".1e",
    "test_accuracy": ".4f",
    "sklearn_test_accuracy": ".4f",
    "wall_time_s": ".3f",
}
