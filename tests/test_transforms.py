"""xent_jax under JAX transformations: jit, vmap and scan agree with eager execution for every
loss, same-shaped calls never retrace, and options travel as pytrees (traced values included)."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xent_jax
from tests import registry
from tests.tolerances import assert_close

B, K, V = 4, 5, 3
IGNORE = -100


def _simplex(rng, shape):
    p = rng.uniform(0.05, 1.0, shape)
    return (p / p.sum(-1, keepdims=True)).astype(np.float32)


def _logits(rng):
    return rng.normal(scale=2.0, size=(B, K)).astype(np.float32)


def _class_mask():
    mask = np.ones((B, K), bool)
    mask[:, 3] = False
    mask[2, 0] = False
    return mask


def _labels_in(rng, allowed):
    return np.argmax(rng.random(allowed.shape) * allowed, axis=-1).astype(np.int32)


def _example_mask():
    return np.array([True, False, True, True])


def _element_mask(rng):
    return rng.random((B, K)) < 0.7


# name -> rng -> (positional arrays, array-valued keyword options, static keyword options).
# Array-valued options are passed through jit/vmap/scan as a pytree; static ones are closed over.
CASES = {
    "entropy": lambda rng: ((_simplex(rng, (B, K)),), {"where": _class_mask()}, {"base": 2}),
    "cross_entropy": lambda rng: ((_simplex(rng, (B, K)), _simplex(rng, (B, K))), {}, {}),
    "kl_divergence": lambda rng: (
        (_simplex(rng, (B, K)), _simplex(rng, (B, K))),
        {"where": _class_mask()},
        {},
    ),
    "js_divergence": lambda rng: (
        (_simplex(rng, (B, K)), _simplex(rng, (B, K))),
        {},
        {"base": 2},
    ),
    "binary_entropy": lambda rng: ((rng.uniform(0.01, 0.99, (B, K)).astype(np.float32),), {}, {}),
    "softmax_cross_entropy": lambda rng: (
        (_logits(rng), _simplex(rng, (B, K))),
        {"where": _example_mask(), "class_weights": rng.uniform(0.5, 2, K).astype(np.float32)},
        {"label_smoothing": 0.1, "z_loss": 1e-2, "logit_softcap": 5.0},
    ),
    "softmax_cross_entropy_with_integer_labels": lambda rng: (
        (_logits(rng), np.where(np.arange(B) == 1, IGNORE, _labels_in(rng, _class_mask()))),
        {"where": _class_mask(), "class_weights": rng.uniform(0.5, 2, K).astype(np.float32)},
        {"ignore_index": IGNORE, "label_smoothing": 0.1, "z_loss": 1e-2, "logit_softcap": 5.0},
    ),
    "sigmoid_binary_cross_entropy": lambda rng: (
        (_logits(rng), rng.random((B, K)).astype(np.float32)),
        {"where": _element_mask(rng), "pos_weight": rng.uniform(0.5, 3, K).astype(np.float32)},
        {"label_smoothing": 0.1},
    ),
    "sigmoid_focal_loss": lambda rng: (
        (_logits(rng), rng.random((B, K)).astype(np.float32)),
        {"where": _element_mask(rng)},
        {"alpha": 0.25, "gamma": 2.0},
    ),
    "softmax_focal_loss": lambda rng: (
        (_logits(rng), _simplex(rng, (B, K))),
        {"where": _example_mask(), "alpha": rng.uniform(0.1, 1, K).astype(np.float32)},
        {"gamma": 2.0},
    ),
    "softmax_focal_loss_with_integer_labels": lambda rng: (
        (_logits(rng), np.where(np.arange(B) == 2, IGNORE, rng.integers(0, K, B)).astype(np.int32)),
        {"where": _example_mask()},
        {"alpha": 0.25, "gamma": 1.5, "ignore_index": IGNORE},
    ),
    "poly_loss_cross_entropy": lambda rng: (
        (_logits(rng), _simplex(rng, (B, K))),
        {"where": _example_mask()},
        {"epsilon": 2.0, "label_smoothing": 0.1},
    ),
    "binary_cross_entropy": lambda rng: (
        (rng.uniform(0.01, 0.99, (B, K)).astype(np.float32), rng.random((B, K)).astype(np.float32)),
        {"where": _element_mask(rng)},
        {"label_smoothing": 0.1},
    ),
    "categorical_cross_entropy": lambda rng: (
        (rng.uniform(0.01, 0.99, (B, K)).astype(np.float32), _simplex(rng, (B, K))),
        {},
        {"label_smoothing": 0.1},
    ),
    "sparse_categorical_cross_entropy": lambda rng: (
        (
            rng.uniform(0.01, 0.99, (B, K)).astype(np.float32),
            np.where(np.arange(B) == 0, IGNORE, rng.integers(0, K, B)).astype(np.int32),
        ),
        {"where": _example_mask()},
        {"ignore_index": IGNORE},
    ),
}
WITHOUT_REDUCTION = set(registry.select(reduces=False))
PARAMS = [
    (name, reduction)
    for name in CASES
    for reduction in ([None] if name in WITHOUT_REDUCTION else ["none", "sum", "mean"])
]


def build(name, reduction, seed=0):
    """(loss of (args, array_options), args, array_options) for one case and seed."""
    args, arrays, static = CASES[name](np.random.default_rng(seed))
    if reduction is not None:
        static = {**static, "reduction": reduction}
    fn = getattr(xent_jax, name)

    def loss(args, arrays):
        return fn(*args, **arrays, **static)

    return loss, args, arrays


def stacked(name, reduction, seeds):
    """The loss and its inputs for several seeds, stacked along a new leading axis."""
    loss = build(name, reduction, seeds[0])[0]
    slices = [build(name, reduction, seed)[1:] for seed in seeds]
    return loss, jax.tree.map(lambda *xs: np.stack(xs), *slices), slices


# One reduction per loss (mean: the reduction with most logic).
ONE_PER_LOSS = [(name, None if name in WITHOUT_REDUCTION else "mean") for name in CASES]
NONE_AND_MEAN = [p for p in PARAMS if p[1] != "sum"]


@pytest.mark.parametrize(("name", "reduction"), NONE_AND_MEAN)
def test_jit_matches_eager(name, reduction):
    loss, args, arrays = build(name, reduction)
    eager = loss(args, arrays)
    jitted = jax.jit(loss)(args, arrays)
    assert jitted.shape == eager.shape
    assert jitted.dtype == eager.dtype
    assert np.all(np.isfinite(np.asarray(eager)))
    assert_close(jitted, eager)


@pytest.mark.parametrize(("name", "reduction"), ONE_PER_LOSS)
def test_vmap_matches_loop(name, reduction):
    loss, (args, arrays), slices = stacked(name, reduction, seeds=range(V))
    expected = np.stack([np.asarray(loss(*s)) for s in slices])
    assert_close(jax.vmap(loss)(args, arrays), expected)
    # Options shared by every slice (in_axes=None), jitted: the same as batching copies of them.
    shared = jax.jit(jax.vmap(loss, in_axes=(0, None)))(args, slices[0][1])
    copies = jax.tree.map(lambda a: np.stack([a] * V), slices[0][1])
    assert_close(shared, jax.vmap(loss)(args, copies))


@pytest.mark.parametrize(("name", "reduction"), ONE_PER_LOSS)
def test_same_shaped_calls_trace_once(name, reduction):
    chex.clear_trace_counter()
    loss, _, _ = build(name, reduction)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def traced_once(args, arrays):
        return loss(args, arrays)

    for seed in range(3):
        _, args, arrays = build(name, reduction, seed)
        assert_close(traced_once(args, arrays), loss(args, arrays))


# Value and gradient of a scanned, training-style loop: two compilations per loss, so one loss
# of each kind (softmax dense / integer, elementwise, probabilities, divergence).
SCANNED = [
    ("softmax_cross_entropy", "mean"),
    ("softmax_cross_entropy_with_integer_labels", "mean"),
    ("sigmoid_binary_cross_entropy", "sum"),
    ("categorical_cross_entropy", "mean"),
    ("kl_divergence", None),
]


@pytest.mark.parametrize(("name", "reduction"), SCANNED)
def test_inside_lax_scan(name, reduction):
    loss, (args, arrays), _ = stacked(name, reduction, seeds=range(V))

    def total_by_scan(first, rest, arrays):
        def step(carry, xs):
            x, r, a = xs
            return carry + jnp.sum(loss((x, *r), a)), None

        total, _ = jax.lax.scan(step, jnp.zeros((), jnp.float32), (first, rest, arrays))
        return total

    def total_by_loop(first, rest, arrays):
        slices = [jax.tree.map(lambda a, i=i: a[i], (first, rest, arrays)) for i in range(V)]
        return sum(jnp.sum(loss((x, *r), a)) for x, r, a in slices)

    first, rest = args[0], tuple(args[1:])
    by_scan = jax.jit(jax.value_and_grad(total_by_scan))
    by_loop = jax.jit(jax.value_and_grad(total_by_loop))
    (total, grad), (expected_total, expected_grad) = (
        by_scan(first, rest, arrays),
        by_loop(first, rest, arrays),
    )
    assert np.all(np.isfinite(np.asarray(grad)))
    assert_close(total, expected_total)
    assert_close(grad, expected_grad)


# Scalar hyperparameters passed as traced values (schedules, sweeps): name -> options.
TRACED_SCALARS = {
    name: {option: registry.SCALAR_OPTION_VALUES[option] for option in loss.traceable}
    for name, loss in registry.REGISTRY.items()
    if loss.traceable and name in CASES
}


def test_cases_cover_every_loss():
    assert set(CASES) == set(registry.select())


@pytest.mark.parametrize("name", list(TRACED_SCALARS))
def test_traced_scalar_options_match_python_floats(name):
    args, _, _ = CASES[name](np.random.default_rng(7))
    fn = getattr(xent_jax, name)
    options = TRACED_SCALARS[name]
    eager = fn(*args, **options, reduction="none")
    traced = jax.jit(lambda args, options: fn(*args, **options, reduction="none"))(
        args, jax.tree.map(jnp.float32, options)
    )
    assert_close(traced, eager)


def test_vmap_over_label_smoothing_sweep():
    args, _, _ = CASES["softmax_cross_entropy_with_integer_labels"](np.random.default_rng(8))
    logits, labels = args
    labels = np.where(labels == IGNORE, 0, labels)
    fn = xent_jax.softmax_cross_entropy_with_integer_labels
    sweep = np.array([0.0, 0.05, 0.3], np.float32)
    swept = jax.vmap(lambda eps: fn(logits, labels, label_smoothing=eps, reduction="mean"))(sweep)
    looped = [fn(logits, labels, label_smoothing=float(eps), reduction="mean") for eps in sweep]
    assert_close(swept, np.stack(looped))


def test_nested_option_pytree_through_jit():
    (logits, labels), arrays, static = CASES["softmax_cross_entropy"](np.random.default_rng(9))
    config = {"loss": {"arrays": arrays, "scalars": {"z_loss": jnp.float32(static["z_loss"])}}}

    @jax.jit
    def step(logits, labels, config):
        return xent_jax.softmax_cross_entropy(
            logits,
            labels,
            **config["loss"]["arrays"],
            **config["loss"]["scalars"],
            reduction="mean",
        )

    expected = xent_jax.softmax_cross_entropy(
        logits, labels, **arrays, z_loss=static["z_loss"], reduction="mean"
    )
    assert_close(step(logits, labels, config), expected)


# Per-example gradients: vmap of grad over single examples (batch shape ()) equals the rows of
# the gradient of the summed batch loss.
PER_EXAMPLE = registry.select(inputs="logits")


@pytest.mark.parametrize("name", PER_EXAMPLE)
def test_vmap_of_grad_gives_per_example_gradients(name):
    (logits, labels), _, _ = CASES[name](np.random.default_rng(10))
    labels = np.where(labels == IGNORE, 0, labels)
    fn = getattr(xent_jax, name)
    single = jax.vmap(jax.grad(lambda z, y: jnp.sum(fn(z, y))))(logits, labels)
    batch = jax.jit(jax.grad(lambda z: jnp.sum(fn(z, labels))))(logits)
    assert_close(single, batch)
