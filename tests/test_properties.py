"""Hypothesis properties of the information measures and the logits losses.

Deterministic (``derandomize=True``, no example database) and small: fixed shapes so that each
jitted function compiles once, computed in float64 so the properties hold to the float64
tolerances.
"""

from __future__ import annotations

import functools

import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings

import xent_jax
from tests import registry
from tests.tolerances import tolerance

BATCH, NUM_CLASSES = 4, 5
SHAPE = (BATCH, NUM_CLASSES)
TOL = tolerance(np.float64)
LOG2 = float(np.log(2.0))

fast = settings(deadline=None, max_examples=100, derandomize=True, database=None)


def _x64(fn):
    """Runs the test body with 64-bit JAX enabled (a context, never the global flag)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with jax.enable_x64(True):
            return fn(*args, **kwargs)

    return wrapper


@st.composite
def distributions(draw, allow_zeros=True):
    """``[BATCH, NUM_CLASSES]`` rows of probabilities, possibly with exact zeros."""
    low = 0.0 if allow_zeros else 1e-3
    raw = draw(hnp.arrays(np.float64, SHAPE, elements=st.floats(low, 1.0)))
    raw[:, 0] += 1e-3  # every row has mass
    return raw / raw.sum(axis=-1, keepdims=True)


logits_arrays = hnp.arrays(np.float64, SHAPE, elements=st.floats(-30.0, 30.0))
row_shifts = hnp.arrays(np.float64, (BATCH, 1), elements=st.floats(-50.0, 50.0))
integer_labels = hnp.arrays(np.int32, (BATCH,), elements=st.integers(0, NUM_CLASSES - 1))

entropy = jax.jit(xent_jax.entropy)
cross_entropy = jax.jit(xent_jax.cross_entropy)
kl_divergence = jax.jit(xent_jax.kl_divergence)
js_divergence = jax.jit(xent_jax.js_divergence)


def _np(x):
    return np.asarray(x, np.float64)


@fast
@given(distributions(), distributions())
@_x64
def test_gibbs_inequality(p, q):
    h_p = _np(entropy(p))
    h_pq = _np(cross_entropy(p, q))
    assert np.all(h_pq >= h_p - (TOL["atol"] + TOL["rtol"] * np.abs(h_p))), (h_pq, h_p)


@fast
@given(distributions(), distributions())
@_x64
def test_kl_is_nonnegative_and_zero_only_on_equal_inputs(p, q):
    np.testing.assert_allclose(_np(kl_divergence(p, p)), 0.0, atol=TOL["atol"])
    kl = _np(kl_divergence(p, q))
    # Pinsker: KL >= |p - q|_1^2 / 2, so KL > 0 whenever p != q (and KL >= 0 always).
    pinsker = 0.5 * np.abs(p - q).sum(-1) ** 2
    assert np.all(kl >= pinsker - (TOL["atol"] + TOL["rtol"] * pinsker)), (kl, pinsker)
    # Strictly positive once p and q differ by more than rounding can hide (1e-121 cannot show).
    assert np.all(kl[np.abs(p - q).sum(-1) > 1e-6] > 0.0)


@fast
@given(distributions(), distributions())
@_x64
def test_js_is_symmetric_and_bounded_by_log_2(p, q):
    pq, qp = _np(js_divergence(p, q)), _np(js_divergence(q, p))
    np.testing.assert_allclose(pq, qp, **TOL)
    assert np.all(pq >= -TOL["atol"]) and np.all(pq <= LOG2 * (1 + TOL["rtol"]))


# Softmax losses with their labels; each must ignore a constant added to a row of logits.
def _loss(name, **kwargs):
    """A jitted ``name`` of (logits, dense labels, integer labels), taking the labels it uses."""
    fn = jax.jit(functools.partial(registry.REGISTRY[name].fn, **kwargs))
    if registry.REGISTRY[name].labels == "integer":
        return lambda z, dense, integer: fn(z, integer)
    return lambda z, dense, integer: fn(z, dense)


CLASS_WEIGHTS = np.array([0.5, 1.0, 2.0, 1.5, 0.7])
CLASS_MASK = np.array([[True, True, False, True, True]])
# name -> the option sets it is checked with.
SHIFT_OPTIONS = {
    "softmax_cross_entropy": [
        {},
        {"label_smoothing": 0.1, "class_weights": CLASS_WEIGHTS, "where": CLASS_MASK},
    ],
    "softmax_cross_entropy_with_integer_labels": [
        {},
        {"label_smoothing": 0.2, "class_weights": CLASS_WEIGHTS},
    ],
    "softmax_focal_loss": [{"gamma": 2.0}],
    "softmax_focal_loss_with_integer_labels": [{"gamma": 1.5, "alpha": 0.25}],
    "poly_loss_cross_entropy": [{"epsilon": 1.0}],
}
assert set(SHIFT_OPTIONS) == set(registry.select(softmax=True)), "a softmax loss is unchecked"
SHIFT_INVARIANT = {
    f"{name}/{i}": _loss(name, **options)
    for name, option_sets in SHIFT_OPTIONS.items()
    for i, options in enumerate(option_sets)
}


@fast
@given(logits_arrays, row_shifts, distributions(), integer_labels)
@_x64
def test_softmax_losses_ignore_a_constant_per_row(logits, shift, dense, integer):
    integer = np.where(CLASS_MASK[0][integer], integer, 0)  # labels on unmasked classes
    dense = np.where(CLASS_MASK, dense, 0.0)
    dense = dense / dense.sum(-1, keepdims=True)
    for name, loss in SHIFT_INVARIANT.items():
        np.testing.assert_allclose(
            _np(loss(logits + shift, dense, integer)),
            _np(loss(logits, dense, integer)),
            **TOL,
            err_msg=name,
        )


def _grad_of_sum(loss):
    return jax.jit(jax.grad(lambda z, labels: jnp.sum(loss(z, labels))))


# The cross-entropies (dense and integer labels), without and with label smoothing.
GRADIENTS = {
    (name, smoothing): _grad_of_sum(
        functools.partial(registry.REGISTRY[name].fn, label_smoothing=smoothing)
    )
    for name in registry.select(accepts="class_weights")
    for smoothing in (0.0, 0.3)
}


@fast
@given(logits_arrays, distributions(), integer_labels)
@_x64
def test_softmax_cross_entropy_gradient_sums_to_zero_over_classes(logits, dense, integer):
    # d/dz of CE is softmax(z) - t, and both sum to one over the classes.
    for (name, smoothing), grad in GRADIENTS.items():
        g = _np(grad(logits, integer if registry.REGISTRY[name].labels == "integer" else dense))
        message = f"{name}, label_smoothing={smoothing}"
        np.testing.assert_allclose(g.sum(-1), 0.0, atol=TOL["atol"], err_msg=message)


sigmoid_bce = jax.jit(xent_jax.sigmoid_binary_cross_entropy)
sigmoid_bce_smoothed = jax.jit(
    functools.partial(xent_jax.sigmoid_binary_cross_entropy, label_smoothing=0.2)
)


@fast
@given(logits_arrays, hnp.arrays(np.float64, SHAPE, elements=st.floats(0.0, 1.0)))
@_x64
def test_sigmoid_bce_is_symmetric_under_flipping_logit_and_label(logits, labels):
    for loss in (sigmoid_bce, sigmoid_bce_smoothed):
        np.testing.assert_allclose(
            _np(loss(-logits, 1.0 - labels)), _np(loss(logits, labels)), **TOL
        )
