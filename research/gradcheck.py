"""Gradient check: ``jax.grad`` / ``jax.hessian`` of every xent_jax loss against closed forms.

1. ``jax.grad`` of the three logits losses against ``xent_jax.analytic`` (softmax - target,
   sigmoid - y, with every option: smoothing, class weights, masks, z-loss, soft-capping,
   -inf logits, another class axis, ignore_index) for every reduction, float32 and float64.
2. ``jax.hessian`` per example against diag(p) - p p^T (and sigmoid(1 - sigmoid) for BCE).
3. Losses without a closed form (focal, poly, probability losses, information measures):
   ``jax.grad`` against central finite differences in float64.

Errors are max |autodiff - reference| (abs) and that divided by max |reference| (rel).

    python -m research.gradcheck --config configs/gradcheck.py[:smoke] --workdir DIR
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from absl import app

import xent_jax
from research.common import Workdir, check_config, cli, markdown_table
from xent_jax import analytic

DTYPES = {"float32": jnp.float32, "float64": jnp.float64}
IGNORE = -100


def errors(auto: Any, reference: Any) -> tuple[float, float]:
    """(max abs error, max abs error / max |reference|); NaN anywhere counts as inf."""
    auto, reference = np.asarray(auto, np.float64), np.asarray(reference, np.float64)
    diff = np.abs(auto - reference)
    if not np.all(np.isfinite(diff)):
        return float("inf"), float("inf")
    scale = max(float(np.max(np.abs(reference), initial=0.0)), np.finfo(np.float64).tiny)
    return float(diff.max(initial=0.0)), float(diff.max(initial=0.0) / scale)


def make_data(config: Any) -> dict[str, np.ndarray]:
    """Random float64 inputs: logits, labels of every kind, masks, weights."""
    rng = np.random.default_rng(config.seed)
    b, k = config.batch, config.num_classes
    masked = k - 1  # the class that the class-mask cases remove
    soft = rng.dirichlet(np.ones(k - 1), size=b)
    return {
        "logits": rng.normal(0.0, config.logit_scale, (b, k)),
        "soft": np.concatenate([soft, np.zeros((b, 1))], axis=1),  # no mass on `masked`
        "int": rng.integers(0, k - 1, b).astype(np.int32),
        "class_mask": np.arange(k) != masked,
        "example_mask": np.arange(b) % 3 != 1,
        "class_weights": rng.uniform(0.5, 2.0, k),
        "binary_logits": rng.normal(0.0, config.logit_scale, (b, k)),
        "binary_labels": rng.integers(0, 2, (b, k)).astype(np.float64),
        "binary_soft": rng.uniform(0.0, 1.0, (b, k)),
        "pos_weight": rng.uniform(0.5, 3.0, k),
        "probs": rng.dirichlet(np.ones(k), size=b),
        "probs2": rng.dirichlet(np.ones(k), size=b),
        "binary_probs": rng.uniform(0.05, 0.95, (b, k)),
    }


def softmax_option_sets(d: dict[str, np.ndarray], integer: bool) -> Iterator[tuple]:
    """(name, logits, labels, kwargs) for the softmax losses."""
    z, y = d["logits"], d["int"] if integer else d["soft"]
    yield "plain", z, y, {}
    yield "label_smoothing=0.1", z, y, {"label_smoothing": 0.1}
    yield "class_weights", z, y, {"class_weights": d["class_weights"]}
    yield "where: class mask", z, y, {"where": d["class_mask"][None, :]}
    yield "where: example mask", z, y, {"where": d["example_mask"]}
    yield "z_loss=1e-2", z, y, {"z_loss": 1e-2}
    yield "logit_softcap=5", z, y, {"logit_softcap": 5.0}
    yield "-inf logits", np.where(d["class_mask"], z, -np.inf), y, {}
    yield "logits x 1e3", z * 1e3, y, {}
    yield "axis=0", z.T, (y if integer else y.T), {"axis": 0}
    if integer:
        y_ignored = np.where(d["example_mask"], y, IGNORE).astype(np.int32)
        yield "ignore_index", z, y_ignored, {"ignore_index": IGNORE}
    everything = {
        "label_smoothing": 0.1,
        "class_weights": d["class_weights"],
        "z_loss": 1e-2,
        "logit_softcap": 5.0,
        "where": d["class_mask"][None, :],
    }
    yield "all options", z, y, everything


def sigmoid_option_sets(d: dict[str, np.ndarray]) -> Iterator[tuple]:
    z, y = d["binary_logits"], d["binary_labels"]
    yield "plain", z, y, {}
    yield "soft labels", z, d["binary_soft"], {}
    yield "label_smoothing=0.1", z, y, {"label_smoothing": 0.1}
    yield "pos_weight", z, y, {"pos_weight": d["pos_weight"]}
    yield "where: element mask", z, y, {"where": d["binary_soft"] > 0.3}
    yield "logits x 1e3", z * 1e3, y, {}
    yield (
        "all options",
        z,
        d["binary_soft"],
        {"label_smoothing": 0.1, "pos_weight": d["pos_weight"], "where": d["binary_soft"] > 0.3},
    )


GRAD_CASES = {
    "softmax_cross_entropy": (
        xent_jax.softmax_cross_entropy,
        analytic.softmax_cross_entropy_grad,
        lambda d: softmax_option_sets(d, integer=False),
    ),
    "softmax_cross_entropy_with_integer_labels": (
        xent_jax.softmax_cross_entropy_with_integer_labels,
        analytic.softmax_cross_entropy_with_integer_labels_grad,
        lambda d: softmax_option_sets(d, integer=True),
    ),
    "sigmoid_binary_cross_entropy": (
        xent_jax.sigmoid_binary_cross_entropy,
        analytic.sigmoid_binary_cross_entropy_grad,
        sigmoid_option_sets,
    ),
}


def cast(value: Any, dtype) -> Any:
    """Float arrays to dtype; integer / boolean arrays and Python scalars unchanged."""
    if isinstance(value, np.ndarray) and np.issubdtype(value.dtype, np.floating):
        return jnp.asarray(value, dtype)
    return value


def run_batched(fns: list[Callable], inputs: list[jax.Array]) -> list[Any]:
    """``[f(x) for f, x in zip(fns, inputs)]`` as ONE jit: one compilation for a whole table
    instead of one per case (eager custom-JVP calls compile on every call)."""
    return jax.jit(lambda xs: [f(x) for f, x in zip(fns, xs, strict=True)])(inputs)


def _grad_pair(z, *, loss, closed_form, labels, kwargs, reduction):
    total = lambda z_: jnp.sum(loss(z_, labels, reduction=reduction, **kwargs))
    return jax.grad(total)(z), closed_form(z, labels, reduction=reduction, **kwargs)


def grad_rows(config: Any, d: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """jax.grad vs the analytic gradient for every (loss, option set, dtype, reduction)."""
    rows = []
    for loss_name, (loss, closed_form, option_sets) in GRAD_CASES.items():
        for dtype_name in config.dtypes:
            dtype = DTYPES[dtype_name]
            cases = [
                (option, reduction, cast(z, dtype), cast(y, dtype), kwargs)
                for option, z, y, kwargs in option_sets(d)
                for reduction in config.reductions
            ]
            fns = [
                functools.partial(
                    _grad_pair,
                    loss=loss,
                    closed_form=closed_form,
                    labels=y,
                    reduction=r,
                    kwargs={k: cast(v, dtype) for k, v in kw.items()},
                )
                for _, r, _, y, kw in cases
            ]
            results = run_batched(fns, [z for _, _, z, _, _ in cases])
            for (option, reduction, *_), (auto, ref) in zip(cases, results, strict=True):
                abs_err, rel_err = errors(auto, ref)
                rows.append(
                    {
                        "loss": loss_name,
                        "options": option,
                        "dtype": dtype_name,
                        "reduction": reduction,
                        "grad_dtype": str(auto.dtype),
                        "max_abs_error": abs_err,
                        "max_rel_error": rel_err,
                    }
                )
    return rows


def hessian_rows(config: Any, d: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """Per-example Hessians (vmap of jax.hessian on one row) against the closed forms."""
    sce = xent_jax.softmax_cross_entropy
    sce_int = xent_jax.softmax_cross_entropy_with_integer_labels
    onehot = np.eye(config.num_classes)[d["int"]]
    cases = [
        ("softmax_cross_entropy", "one-hot labels", lambda z, y: sce(z, y), onehot),
        ("softmax_cross_entropy", "soft labels", lambda z, y: sce(z, y), d["soft"]),
        (
            "softmax_cross_entropy",
            "label_smoothing=0.1",
            lambda z, y: sce(z, y, label_smoothing=0.1),
            d["soft"],
        ),
        (
            "softmax_cross_entropy_with_integer_labels",
            "plain",
            lambda z, y: sce_int(z, y),
            d["int"],
        ),
        (
            "softmax_cross_entropy_with_integer_labels",
            "label_smoothing=0.1",
            lambda z, y: sce_int(z, y, label_smoothing=0.1),
            d["int"],
        ),
    ]
    rows = []
    for dtype_name in config.dtypes:
        dtype = DTYPES[dtype_name]
        z = jnp.asarray(d["logits"], dtype)
        x = jnp.asarray(d["binary_logits"], dtype).reshape(-1)
        y = jnp.asarray(d["binary_labels"], dtype).reshape(-1)
        fns = [
            functools.partial(
                lambda z_, fn, labels: jax.vmap(jax.hessian(fn))(z_, labels),
                fn=fn,
                labels=cast(labels, dtype),
            )
            for _, _, fn, labels in cases
        ]
        second = jax.vmap(jax.grad(jax.grad(xent_jax.sigmoid_binary_cross_entropy)))
        fns.append(lambda x_, y_=y, f=second: f(x_, y_))
        results = run_batched(fns, [z] * len(cases) + [x])
        s = jax.nn.sigmoid(x)
        references = [analytic.softmax_cross_entropy_hessian(z)] * len(cases) + [s * (1 - s)]
        names = [(loss, option, "diag(p) - p p^T") for loss, option, _, _ in cases]
        names.append(("sigmoid_binary_cross_entropy", "plain", "sigmoid (1 - sigmoid)"))
        for (loss_name, option, formula), auto, ref in zip(names, results, references, strict=True):
            abs_err, rel_err = errors(auto, ref)
            rows.append(
                {
                    "loss": loss_name,
                    "options": option,
                    "dtype": dtype_name,
                    "reference": formula,
                    "max_abs_error": abs_err,
                    "max_rel_error": rel_err,
                }
            )
    return rows


def finite_difference(f: Callable, x: jax.Array, h: float) -> jax.Array:
    """Central differences of scalar f at x, all coordinates at once (vmap)."""
    basis = jnp.eye(x.size, dtype=x.dtype).reshape(x.size, *x.shape)
    plus = jax.vmap(lambda e: f(x + h * e))(basis)
    minus = jax.vmap(lambda e: f(x - h * e))(basis)
    return ((plus - minus) / (2 * h)).reshape(x.shape)


def fd_cases(d: dict[str, np.ndarray]) -> Iterator[tuple[str, str, Callable, np.ndarray]]:
    """(loss, options, scalar function of one input, input) for losses with no closed form."""
    z, zb, y, yi = d["logits"], d["binary_logits"], d["soft"], d["int"]
    onehot = np.eye(z.shape[1])[yi]
    yb, p, q, pb = d["binary_labels"], d["probs"], d["probs2"], d["binary_probs"]
    alpha = d["class_weights"] / d["class_weights"].sum()
    yield "softmax_focal_loss", "gamma=2", lambda t: xent_jax.softmax_focal_loss(t, y).sum(), z
    yield (
        "softmax_focal_loss",
        "gamma=2, alpha per class",
        lambda t: xent_jax.softmax_focal_loss(t, onehot, alpha=alpha).sum(),
        z,
    )
    yield (
        "softmax_focal_loss_with_integer_labels",
        "gamma=2",
        (lambda t: xent_jax.softmax_focal_loss_with_integer_labels(t, yi).sum()),
        z,
    )
    yield (
        "sigmoid_focal_loss",
        "alpha=0.25, gamma=2",
        (lambda t: xent_jax.sigmoid_focal_loss(t, yb, alpha=0.25).sum()),
        zb,
    )
    yield (
        "poly_loss_cross_entropy",
        "epsilon=2",
        (lambda t: xent_jax.poly_loss_cross_entropy(t, y).sum()),
        z,
    )
    yield (
        "binary_cross_entropy",
        "probs",
        (lambda t: xent_jax.binary_cross_entropy(t, yb).sum()),
        pb,
    )
    yield (
        "categorical_cross_entropy",
        "probs",
        (lambda t: xent_jax.categorical_cross_entropy(t, y).sum()),
        p,
    )
    yield (
        "sparse_categorical_cross_entropy",
        "probs",
        (lambda t: xent_jax.sparse_categorical_cross_entropy(t, yi).sum()),
        p,
    )
    yield "entropy", "d/dp", lambda t: xent_jax.entropy(t).sum(), p
    yield "cross_entropy", "d/dq", lambda t: xent_jax.cross_entropy(p, t).sum(), q
    yield "cross_entropy", "d/dp", lambda t: xent_jax.cross_entropy(t, q).sum(), p
    yield "kl_divergence", "d/dq", lambda t: xent_jax.kl_divergence(p, t).sum(), q
    yield "kl_divergence", "d/dp", lambda t: xent_jax.kl_divergence(t, q).sum(), p
    yield "js_divergence", "d/dp", lambda t: xent_jax.js_divergence(t, q).sum(), p
    yield "binary_entropy", "d/dp", lambda t: xent_jax.binary_entropy(t).sum(), pb


def fd_rows(config: Any, d: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    cases = list(fd_cases(d))
    fns = [
        functools.partial(
            lambda x, fn: (jax.grad(fn)(x), finite_difference(fn, x, config.fd_step)), fn=fn
        )
        for _, _, fn, _ in cases
    ]
    results = run_batched(fns, [jnp.asarray(x, jnp.float64) for *_, x in cases])
    rows = []
    for (loss_name, option, _, _), (auto, numeric) in zip(cases, results, strict=True):
        abs_err, rel_err = errors(auto, numeric)
        rows.append(
            {
                "loss": loss_name,
                "options": option,
                "dtype": "float64",
                "max_abs_error": abs_err,
                "max_rel_error": rel_err,
                "ok": rel_err <= config.fd_tol,
            }
        )
    return rows


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (loss, options): the worst error over reductions, per dtype."""
    table: dict[tuple[str, str], dict[str, Any]] = {}
    for row in rows:
        entry = table.setdefault(
            (row["loss"], row["options"]), {"loss": row["loss"], "options": row["options"]}
        )
        for kind in ("abs", "rel"):
            key = f"{row['dtype']}_max_{kind}"
            entry[key] = max(entry.get(key, 0.0), row[f"max_{kind}_error"])
    return list(table.values())


def plot_errors(summary: list[dict[str, Any]], tolerances: dict[str, float]) -> plt.Figure:
    labels = [
        f"{r.get('kind', 'grad')}: {r['loss'].replace('_cross_entropy', '_CE')}: {r['options']}"
        for r in summary
    ]
    fig, ax = plt.subplots(figsize=(9, 0.28 * len(summary) + 1.5))
    pos = np.arange(len(summary))
    for offset, (dtype, color) in zip(
        (-0.2, 0.2), (("float32", "C0"), ("float64", "C1")), strict=True
    ):
        values = [max(r.get(f"{dtype}_max_rel", np.nan), 1e-18) for r in summary]
        ax.barh(pos + offset, values, height=0.4, color=color, label=dtype)
        if dtype in tolerances:
            ax.axvline(
                tolerances[dtype],
                color=color,
                ls="--",
                lw=1,
                label=f"{dtype} tolerance {tolerances[dtype]:g}",
            )
    ax.set_xscale("log")
    ax.set_yticks(pos, labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(
        "max relative error, jax.grad / jax.hessian vs closed form (exact zeros drawn at 1e-18)"
    )
    ax.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2)
    ax.grid(axis="x", alpha=0.3)
    return fig


def rules(config: Any) -> dict[str, tuple]:
    return {
        "seed": (lambda v: isinstance(v, int) and v >= 0, "an int >= 0"),
        "batch": (lambda v: v >= 3, "must be >= 3"),
        "num_classes": (lambda v: v >= 3, "must be >= 3"),
        "logit_scale": (lambda v: v > 0, "must be > 0"),
        "dtypes": (lambda v: len(v) > 0 and set(v) <= set(DTYPES), f"a subset of {list(DTYPES)}"),
        "reductions": (
            lambda v: len(v) > 0 and set(v) <= {"none", "sum", "mean"},
            "a subset of ('none', 'sum', 'mean')",
        ),
        "tol_float32": (lambda v: v > 0, "must be > 0"),
        "tol_float64": (lambda v: v > 0, "must be > 0"),
        "fd_step": (lambda v: 0 < v < 1e-2, "a small positive step"),
        "fd_tol": (lambda v: v > 0, "must be > 0"),
    }


def run(config: Any, workdir: str | Path) -> dict[str, Any]:
    """Run all checks; writes config.json, metrics.jsonl (one line per check), metrics.json,
    tables.md and errors.png to ``workdir`` and returns the metrics."""
    check_config(config, rules(config))
    out = Workdir(workdir)
    out.write_config(config)
    tolerances = {"float32": config.tol_float32, "float64": config.tol_float64}
    with jax.enable_x64(True):
        data = make_data(config)
        grads, hessians, fds = (
            grad_rows(config, data),
            hessian_rows(config, data),
            fd_rows(config, data),
        )
    for row in [*grads, *hessians]:
        row["ok"] = row["max_rel_error"] <= tolerances[row["dtype"]]
    for kind, rows in (("grad", grads), ("hessian", hessians), ("finite_difference", fds)):
        for row in rows:
            out.log(check=kind, **row)
    closed = [*grads, *hessians]
    metrics = {
        **{
            f"max_rel_error_{t}": max(
                (r["max_rel_error"] for r in closed if r["dtype"] == t), default=None
            )
            for t in config.dtypes
        },
        **{
            f"max_abs_error_{t}": max(
                (r["max_abs_error"] for r in closed if r["dtype"] == t), default=None
            )
            for t in config.dtypes
        },
        "max_rel_error_finite_difference": max(r["max_rel_error"] for r in fds),
        "tolerances": tolerances,
        "fd_tolerance": config.fd_tol,
        "grad_checks": len(grads),
        "hessian_checks": len(hessians),
        "finite_difference_checks": len(fds),
        "all_within_tolerance": all(r["ok"] for r in [*closed, *fds]),
        "failures": [r for r in [*closed, *fds] if not r["ok"]],
    }
    out.write_metrics(metrics)
    out.write_json("checks.json", {"grad": grads, "hessian": hessians, "finite_difference": fds})
    grad_summary = summarise(grads)
    out.save_figure(
        plot_errors(
            [*grad_summary, *({**r, "kind": "hessian"} for r in summarise(hessians))], tolerances
        ),
        "errors.png",
    )
    fmt = {
        k: ".1e"
        for k in (
            "float32_max_abs",
            "float32_max_rel",
            "float64_max_abs",
            "float64_max_rel",
            "max_abs_error",
            "max_rel_error",
        )
    }
    out.write_text(
        "tables.md",
        f"Random inputs: batch {config.batch}, {config.num_classes} classes, logits ~ "
        f"N(0, {config.logit_scale:g}^2), seed {config.seed}. abs = max |autodiff - closed form|,"
        " rel = abs / max |closed form|; worst over reductions "
        f"{tuple(config.reductions)}. Tolerances (rel): float32 {config.tol_float32:g}, float64 "
        f"{config.tol_float64:g}; all within tolerance: {metrics['all_within_tolerance']}.\n\n"
        "**jax.grad vs xent_jax.analytic** (softmax - target, sigmoid - y)\n\n"
        + markdown_table(grad_summary, formats=fmt)
        + "\n**jax.hessian vs diag(p) - p p^T** (per example)\n\n"
        + markdown_table(summarise(hessians), formats=fmt)
        + f"\n**Losses without a closed form: jax.grad vs central differences** (float64, step "
        f"{config.fd_step:g}, tolerance {config.fd_tol:g})\n\n"
        + markdown_table(
            fds, ["loss", "options", "max_abs_error", "max_rel_error", "ok"], formats=fmt
        ),
    )
    return metrics


def main(argv: list[str]) -> None:
    """absl entry point: ``run`` on ``--config`` and ``--workdir``."""
    cli.run_main(argv, run, "gradcheck")


if __name__ == "__main__":
    cli.define_flags("gradcheck")
    app.run(main, flags_parser=cli.parse_flags)
