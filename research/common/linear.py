"""Fitting an L2-regularised linear model three ways and checking it against scikit-learn.

The objective (scikit-learn's, for ``LogisticRegression(C=C)``) on a flat float64 parameter
vector ``theta`` is ``sum_i loss_i(theta) + ||W||^2 / (2 C)`` (the intercept is not penalised).
Solvers: an Optax first-order optimiser (on the objective divided by n), ``optax.lbfgs`` and
damped Newton with ``jax.hessian``. Run these inside ``jax.enable_x64(True)``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

from research.common.guard import check_finite, progress
from research.common.workdir import Workdir

Objective = Callable[[jax.Array], jax.Array]


@dataclass
class Fit:
    """A solver's result: final parameters, objective, iterations, wall time, history."""

    theta: np.ndarray
    objective: float
    iterations: int
    wall_time_s: float
    history: list[float] = field(default_factory=list)


def _timed_loop(
    name: str,
    step: Callable,
    state: Any,
    max_iter: int,
    log: Workdir,
    log_every: int,
    done: Callable[[dict], bool],
) -> tuple[Any, int, float, list[float]]:
    """Run ``state, stats = step(state)`` up to max_iter times with a progress bar, the
    non-finite guard and logging. A warm-up call compiles before the clock starts; weak types
    in the initial state (optax.lbfgs has some) are made strong so the second call does not
    retrace."""
    state = jax.tree.map(lambda x: jnp.asarray(x, dtype=jnp.asarray(x).dtype), state)
    jax.block_until_ready(step(state))
    history: list[float] = []
    start = time.perf_counter()
    iterations = 0
    with progress(max_iter, name) as bar:
        for it in range(1, max_iter + 1):
            state, stats = step(state)
            stats = {k: float(v) for k, v in stats.items()}
            check_finite(stats["objective"], step=it, what=name, workdir=log.path)
            history.append(stats["objective"])
            iterations = it
            bar.update(1)
            if it % log_every == 0 or it == 1:
                log.log(solver=name, step=it, **stats)
                bar.set_postfix(objective=f"{stats['objective']:.10g}")
            if done(stats):
                log.log(solver=name, step=it, **stats)
                break
    return state, iterations, time.perf_counter() - start, history


def fit_first_order(
    objective: Objective,
    theta0: jax.Array,
    n: int,
    *,
    optimizer: str,
    learning_rate: float,
    schedule: str,
    steps: int,
    log: Workdir,
    log_every: int,
    name: str = "first_order",
) -> Fit:
    """Minimise objective/n with ``optax.<optimizer>`` for a fixed number of steps."""
    lr = learning_rate
    if schedule == "cosine":
        lr = optax.cosine_decay_schedule(learning_rate, steps, alpha=1e-3)
    tx = getattr(optax, optimizer)(lr)
    scaled = lambda theta: objective(theta) / n

    @jax.jit
    def step(state):
        theta, opt_state = state
        value, grad = jax.value_and_grad(scaled)(theta)
        updates, opt_state = tx.update(grad, opt_state, theta)
        stats = {"objective": value * n, "grad_norm": jnp.linalg.norm(grad) * n}
        return (optax.apply_updates(theta, updates), opt_state), stats

    state = (theta0, tx.init(theta0))
    (theta, _), iters, wall, hist = _timed_loop(
        name, step, state, steps, log, log_every, done=lambda s: False
    )
    return Fit(np.asarray(theta), float(objective(theta)), iters, wall, hist)


def fit_lbfgs(
    objective: Objective,
    theta0: jax.Array,
    *,
    max_iter: int,
    tol: float,
    log: Workdir,
    log_every: int,
    name: str = "lbfgs",
) -> Fit:
    """``optax.lbfgs`` (zoom line search) until ||grad|| <= tol or max_iter."""
    tx = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(objective)

    @jax.jit
    def step(state):
        theta, opt_state = state
        value, grad = value_and_grad(theta, state=opt_state)
        updates, opt_state = tx.update(
            grad, opt_state, theta, value=value, grad=grad, value_fn=objective
        )
        theta = optax.apply_updates(theta, updates)
        new_value, new_grad = jax.value_and_grad(objective)(theta)
        return (theta, opt_state), {"objective": new_value, "grad_norm": jnp.linalg.norm(new_grad)}

    state = (theta0, tx.init(theta0))
    (theta, _), iters, wall, hist = _timed_loop(
        name, step, state, max_iter, log, log_every, done=lambda s: s["grad_norm"] <= tol
    )
    return Fit(np.asarray(theta), float(objective(theta)), iters, wall, hist)


def fit_newton(
    objective: Objective,
    theta0: jax.Array,
    *,
    max_iter: int,
    tol: float,
    log: Workdir,
    name: str = "newton",
) -> Fit:
    """Damped Newton: direction pinv(H) g with H = ``jax.hessian`` (the pseudo-inverse copes
    with softmax's flat intercept direction), Armijo backtracking over t = 1, 1/2, ..."""
    ts = 0.5 ** jnp.arange(40)

    @jax.jit
    def step(theta):
        value, grad = jax.value_and_grad(objective)(theta)
        hess = jax.hessian(objective)(theta)
        direction = jnp.linalg.pinv(hess, hermitian=True) @ grad
        decrement = grad @ direction
        trial = jax.vmap(lambda t: objective(theta - t * direction))(ts)
        ok = trial <= value - 1e-4 * ts * decrement
        t = jnp.where(ok.any(), ts[jnp.argmax(ok)], 0.0)
        theta = theta - t * direction
        new_value, new_grad = jax.value_and_grad(objective)(theta)
        stats = {
            "objective": new_value,
            "grad_norm": jnp.linalg.norm(new_grad),
            "newton_decrement": decrement,
            "step_size": t,
        }
        return theta, stats

    done = lambda s: s["grad_norm"] <= tol or s["step_size"] == 0.0
    theta, iters, wall, hist = _timed_loop(name, step, theta0, max_iter, log, 1, done)
    return Fit(np.asarray(theta), float(objective(theta)), iters, wall, hist)


def relative_gap(value: float, reference: float) -> float:
    return (value - reference) / abs(reference)


def plot_convergence(
    ax: plt.Axes, fits: dict[str, Fit], reference: float, bar: float, title: str
) -> None:
    """Relative suboptimality against the best objective seen (scikit-learn's or a solver's)."""
    best = min([reference, *(min(f.history) for f in fits.values() if f.history)])
    for name, fit in fits.items():
        gap = np.maximum((np.asarray(fit.history) - best) / abs(best), 1e-17)
        ax.loglog(np.arange(1, len(gap) + 1), gap, label=f"{name} ({fit.iterations} it)")
    sk_gap = max((reference - best) / abs(best), 1e-17)
    ax.axhline(sk_gap, color="k", lw=1, label="scikit-learn final")
    ax.axhline(bar, color="r", ls="--", lw=1, label=f"bar {bar:g}")
    ax.set_xlabel("iteration")
    ax.set_ylabel("(objective - best) / |best|")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(True, which="major", alpha=0.3)
