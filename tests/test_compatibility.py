"""One test per row of ``docs/compatibility.md``: xent_jax against optax, PyTorch, Keras, SciPy
and scikit-learn, same numbers where the table says "same", the stated difference where it
says otherwise.

optax, SciPy and scikit-learn numbers are computed here. PyTorch and Keras are not
dependencies: their numbers are literals, each cited where it is used (PyTorch's were computed
with torch 2.13.0 in float64 and are shared with ``tests/test_torch_parity.py``; Keras's are the
examples printed in Keras's own documentation).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.spatial.distance
import scipy.special
import scipy.stats
import sklearn.metrics

import xent_jax
from tests import test_torch_parity as torch_numbers
from tests.tolerances import assert_close

RNG = np.random.default_rng(7)
LOGITS = RNG.normal(scale=2.0, size=(4, 5)).astype(np.float32)
LABELS = np.array([0, 3, 1, 4], np.int32)
SOFT = RNG.dirichlet(np.ones(5), 4).astype(np.float32)
BINARY = RNG.random((4, 5)).astype(np.float32)
P = RNG.dirichlet(np.ones(5), 4)
Q = RNG.dirichlet(np.ones(5), 4)


# ---------------------------------------------------------------------------------------------
# optax
# ---------------------------------------------------------------------------------------------

SAME_AS_OPTAX = {
    "softmax_cross_entropy": (LOGITS, SOFT, {}),
    "softmax_cross_entropy_with_integer_labels": (LOGITS, LABELS, {}),
    "sigmoid_binary_cross_entropy": (LOGITS, BINARY, {}),
    "sigmoid_focal_loss": (LOGITS, BINARY, {"alpha": 0.25, "gamma": 2.0}),
    "poly_loss_cross_entropy": (LOGITS, SOFT, {"epsilon": 1.5}),
}


@pytest.mark.parametrize("name", list(SAME_AS_OPTAX))
def test_optax_same_name_same_numbers(name):
    logits, labels, options = SAME_AS_OPTAX[name]
    ours = getattr(xent_jax, name)(logits, labels, **options)
    theirs = getattr(optax.losses, name)(logits, labels, **options)
    assert ours.shape == theirs.shape  # per example (per element): no reduction by default
    assert_close(ours, theirs)


def test_optax_options_are_keyword_only():
    # optax.softmax_cross_entropy_with_integer_labels(logits, labels, axis): axis positional.
    optax.losses.softmax_cross_entropy_with_integer_labels(LOGITS, LABELS, -1)
    with pytest.raises(TypeError, match="positional"):
        xent_jax.softmax_cross_entropy_with_integer_labels(LOGITS, LABELS, -1)


def test_optax_kl_divergence_takes_log_predictions_first():
    ours = xent_jax.kl_divergence(P, Q)  # KL(P || Q), probabilities
    theirs = optax.losses.kl_divergence(np.log(Q), P)  # (log_predictions, targets)
    assert_close(ours, theirs)


def test_optax_neg_inf_logits_are_finite_here_nan_there():
    logits = np.array([[1.0, -np.inf, 0.5]], np.float32)
    target = np.array([[1.0, 0.0, 0.0]], np.float32)
    assert np.isnan(optax.losses.softmax_cross_entropy(logits, target)).all()
    ours = xent_jax.softmax_cross_entropy(logits, target)
    assert_close(ours, xent_jax.softmax_cross_entropy(logits[:, [0, 2]], target[:, [0, 2]]))


def test_optax_label_minus_one_is_nan_here_last_class_there():
    labels = np.array([-1, 3, 1, 4], np.int32)
    theirs = optax.losses.softmax_cross_entropy_with_integer_labels(LOGITS, labels)
    last = optax.losses.softmax_cross_entropy_with_integer_labels(LOGITS, np.full(4, 4))
    assert_close(theirs[0], last[0])
    assert np.isnan(xent_jax.softmax_cross_entropy_with_integer_labels(LOGITS, labels)[0])


def test_optax_half_precision_loss_is_float32_here():
    logits = jnp.asarray(LOGITS, jnp.bfloat16)
    assert optax.losses.softmax_cross_entropy_with_integer_labels(logits, LABELS).dtype == (
        jnp.bfloat16
    )
    assert xent_jax.softmax_cross_entropy_with_integer_labels(logits, LABELS).dtype == (jnp.float32)


def test_optax_sigmoid_bce_wants_float_labels():
    integer = (BINARY > 0.5).astype(np.int32)
    optax.losses.sigmoid_binary_cross_entropy(LOGITS, integer)  # accepted there
    with pytest.raises(TypeError, match="labels"):
        xent_jax.sigmoid_binary_cross_entropy(LOGITS, integer)
    assert_close(
        xent_jax.sigmoid_binary_cross_entropy(LOGITS, integer.astype(np.float32)),
        optax.losses.sigmoid_binary_cross_entropy(LOGITS, integer),
    )


@pytest.mark.parametrize(
    "name", ["softmax_cross_entropy", "poly_loss_cross_entropy"], ids=["softmax", "poly"]
)
def test_optax_class_mask_leaves_softmax_and_targets(name):
    # Target mass on a masked class: both exclude the class from the softmax and the target sum.
    logits, targets = np.array([1.0, 2.0, 0.5], np.float32), np.array([0.2, 0.5, 0.3], np.float32)
    where = np.array([True, True, False])
    ours = getattr(xent_jax, name)(logits, targets, where=where)
    assert_close(ours, getattr(optax.losses, name)(logits, targets, where=where))


def test_optax_tuple_axes():
    x = np.asarray(RNG.normal(size=(2, 3, 4)), np.float32)
    labels = np.array([1, 11], np.int32)
    for name, target in [
        ("softmax_cross_entropy_with_integer_labels", labels),
        ("softmax_cross_entropy", np.asarray(jax.nn.softmax(x, axis=(1, 2)))),
    ]:
        ours = getattr(xent_jax, name)(x, target, axis=(1, 2))
        assert_close(ours, getattr(optax.losses, name)(x, target, axis=(1, 2)))
    # poly_loss_cross_entropy takes one axis here; optax takes a tuple there too.
    optax.losses.poly_loss_cross_entropy(x, np.asarray(jax.nn.softmax(x, axis=(1, 2))), axis=(1, 2))
    with pytest.raises((TypeError, ValueError), match="axis"):
        xent_jax.poly_loss_cross_entropy(x, np.asarray(jax.nn.softmax(x, axis=(1, 2))), axis=(1, 2))


OPTAX_ONLY = [
    "safe_softmax_cross_entropy",
    "kl_divergence_with_log_targets",
    "generalized_kl_divergence",
    "convex_kl_divergence",
    "hinge_loss",
    "multiclass_hinge_loss",
    "perceptron_loss",
    "multiclass_perceptron_loss",
    "sparsemax_loss",
    "multiclass_sparsemax_loss",
    "ctc_loss",
    "ctc_loss_with_forward_probs",
]


@pytest.mark.parametrize("name", OPTAX_ONLY)
def test_optax_only_losses_are_not_here(name):
    assert hasattr(optax.losses, name)
    assert not hasattr(xent_jax, name)


# ---------------------------------------------------------------------------------------------
# PyTorch (numbers: torch 2.13.0, float64; tests/test_torch_parity.py)
# ---------------------------------------------------------------------------------------------


def _torch_case(case: str, reduction: str, **extra):
    options, expected = torch_numbers.INTEGER_CASES[case]
    with jax.enable_x64(True):
        out = xent_jax.softmax_cross_entropy_with_integer_labels(
            torch_numbers.LOGITS, torch_numbers.LABELS, reduction=reduction, **options, **extra
        )
    return np.asarray(out), expected[reduction]


def test_torch_cross_entropy_maps_weight_ignore_index_label_smoothing():
    # F.cross_entropy(input, target, weight=W, ignore_index=2, label_smoothing=0.15)
    for reduction in ("none", "sum", "mean"):
        got, expected = _torch_case("weight+smoothing+ignore", reduction)
        assert_close(got, expected, np.float64)


def test_torch_defaults_differ():
    # torch: reduction="mean", ignore_index=-100, classes on axis 1. Here: "none", None, -1.
    got, expected = _torch_case("plain", "none")
    assert_close(got, expected, np.float64)
    labels = torch_numbers.LABELS_NEG100
    out = xent_jax.softmax_cross_entropy_with_integer_labels(torch_numbers.LOGITS, labels)
    assert np.isnan(out[labels == -100]).all()  # not ignored unless asked
    with jax.enable_x64(True):
        ncd = xent_jax.softmax_cross_entropy_with_integer_labels(
            torch_numbers.LOGITS_NCD,
            torch_numbers.LABELS_ND,
            axis=1,
            class_weights=torch_numbers.WEIGHT,
            label_smoothing=0.1,
            ignore_index=0,
            reduction="mean",
        )
    assert_close(ncd, torch_numbers.NCD_EXPECTED["mean"], np.float64)


def test_torch_mean_over_nothing_is_zero_here_nan_there():
    # torch 2.13.0: F.cross_entropy(LOGITS, full(5, 2), ignore_index=2) is nan.
    out = xent_jax.softmax_cross_entropy_with_integer_labels(
        torch_numbers.LOGITS, np.full(5, 2), ignore_index=2, reduction="mean"
    )
    assert float(out) == 0.0


def test_torch_mean_divides_by_a_negative_weight_sum_too():
    # torch divides the weighted sum by sum(w[y]) whatever its sign; so does xent_jax.
    weights = np.array([1.0, -3.0, 1.0, 1.0])
    with jax.enable_x64(True):
        none = xent_jax.softmax_cross_entropy_with_integer_labels(
            torch_numbers.LOGITS, torch_numbers.LABELS, class_weights=weights
        )
        mean = xent_jax.softmax_cross_entropy_with_integer_labels(
            torch_numbers.LOGITS, torch_numbers.LABELS, class_weights=weights, reduction="mean"
        )
    denominator = weights[torch_numbers.LABELS].sum()
    assert denominator < 0
    assert_close(mean, np.asarray(none).sum() / denominator, np.float64)


def test_torch_smoothing_onto_a_neg_inf_logit_is_finite_here():
    # torch 2.13.0: F.cross_entropy([[1., -inf, .5]], [0], label_smoothing=.1) is inf. Here a
    # -inf logit is masked vocabulary: the same as masking its class with where.
    logits = np.array([[1.0, -np.inf, 0.5]], np.float32)
    ours = xent_jax.softmax_cross_entropy_with_integer_labels(logits, [0], label_smoothing=0.1)
    masked = xent_jax.softmax_cross_entropy_with_integer_labels(
        logits, [0], label_smoothing=0.1, where=np.array([[True, False, True]])
    )
    assert np.isfinite(ours).all()
    assert_close(ours, masked)


def test_torch_probability_targets_mean_over_examples():
    # F.cross_entropy(input, probabilities, weight=W, label_smoothing=0.1): mean divides by N.
    with jax.enable_x64(True):
        for reduction, expected in torch_numbers.SOFT_EXPECTED.items():
            out = xent_jax.softmax_cross_entropy(
                torch_numbers.LOGITS,
                torch_numbers.SOFT_TARGETS,
                class_weights=torch_numbers.WEIGHT,
                label_smoothing=0.1,
                reduction=reduction,
            )
            assert_close(out, expected, np.float64, err_msg=reduction)


def test_torch_bce_with_logits_pos_weight():
    with jax.enable_x64(True):
        for reduction, expected in torch_numbers.BCE_PW_EXPECTED.items():
            out = xent_jax.sigmoid_binary_cross_entropy(
                torch_numbers.BX, torch_numbers.BY, pos_weight=torch_numbers.PW, reduction=reduction
            )
            assert_close(out, expected, np.float64, err_msg=reduction)


def test_torch_binary_cross_entropy_clamps_the_log_keras_clips_the_probability():
    # torch.nn.functional.binary_cross_entropy(tensor([0.]), tensor([1.])) is 100.0: torch clamps
    # log(p) at -100 (documented). Here, as in Keras, p is clipped to [1e-7, 1 - 1e-7].
    with jax.enable_x64(True):
        out = xent_jax.binary_cross_entropy(np.array([0.0]), np.array([1.0]))
    assert_close(out, [-np.log(1e-7)], np.float64)
    assert float(out[0]) != 100.0


# ---------------------------------------------------------------------------------------------
# Keras (numbers: the examples in Keras's documentation)
# ---------------------------------------------------------------------------------------------


def test_keras_binary_crossentropy_argument_order_and_row_mean():
    # keras.losses.binary_crossentropy(y_true=[[0, 1], [0, 0]], y_pred=[[0.6, 0.4], [0.4, 0.6]])
    # -> [0.916, 0.714]: y_true first, and the mean over the last axis. Here probabilities
    # first, elementwise; reduction="mean" over a row gives Keras's number.
    y_pred = np.array([[0.6, 0.4], [0.4, 0.6]], np.float32)
    y_true = np.array([[0.0, 1.0], [0.0, 0.0]], np.float32)
    rows = [
        float(xent_jax.binary_cross_entropy(p, y, reduction="mean"))
        for p, y in zip(y_pred, y_true, strict=True)
    ]
    np.testing.assert_array_equal(np.round(rows, 3), [0.916, 0.714])
    assert xent_jax.binary_cross_entropy(y_pred, y_true).shape == (2, 2)


def test_keras_categorical_crossentropy_renormalises_then_clips():
    # keras.losses.categorical_crossentropy([[0, 1, 0], [0, 0, 1]],
    #     [[0.05, 0.95, 0], [0.1, 0.8, 0.1]]) -> [0.0513, 2.303]
    probs = np.array([[0.05, 0.95, 0.0], [0.1, 0.8, 0.1]], np.float32)
    one_hot = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], np.float32)
    out = xent_jax.categorical_cross_entropy(probs, one_hot)
    np.testing.assert_array_equal(np.round(np.asarray(out, np.float64), 3), [0.051, 2.303])
    assert_close(out, xent_jax.categorical_cross_entropy(3.0 * probs, one_hot))  # renormalised
    sparse = xent_jax.sparse_categorical_cross_entropy(probs, np.array([1, 2]))
    assert_close(sparse, out)


def test_keras_from_logits_is_the_softmax_losses():
    # Keras's from_logits=True: here the softmax (sigmoid) losses take logits.
    with jax.enable_x64(True):
        probs = np.asarray(jax.nn.softmax(LOGITS.astype(np.float64)))
        assert_close(
            xent_jax.categorical_cross_entropy(probs, SOFT.astype(np.float64), eps=0.0),
            xent_jax.softmax_cross_entropy(LOGITS.astype(np.float64), SOFT.astype(np.float64)),
            np.float64,
        )


def test_keras_label_smoothing_formulas():
    # Keras: y * (1 - ls) + ls / K (categorical), y * (1 - ls) + ls / 2 (binary).
    probs = np.asarray(jax.nn.softmax(LOGITS), np.float64)
    one_hot = np.eye(5)[LABELS]
    with jax.enable_x64(True):
        got = xent_jax.categorical_cross_entropy(probs, one_hot, label_smoothing=0.2)
        want = xent_jax.categorical_cross_entropy(probs, one_hot * 0.8 + 0.2 / 5)
        assert_close(got, want, np.float64)
        got = xent_jax.binary_cross_entropy(probs, one_hot, label_smoothing=0.2)
        want = xent_jax.binary_cross_entropy(probs, one_hot * 0.8 + 0.1)
        assert_close(got, want, np.float64)


def test_keras_shape_mismatch_raises_like_keras():
    # Keras raises for labels (N, 1) against predictions (N, 3); so does xent_jax (no silent
    # broadcast).
    for name, first in [
        ("binary_cross_entropy", np.full((2, 3), 0.5, np.float32)),
        ("sigmoid_binary_cross_entropy", np.zeros((2, 3), np.float32)),
    ]:
        with pytest.raises(ValueError, match=re.escape("(2, 1)")):
            getattr(xent_jax, name)(first, np.ones((2, 1), np.float32))


# ---------------------------------------------------------------------------------------------
# SciPy and scikit-learn
# ---------------------------------------------------------------------------------------------


def test_scipy_entropy_axis_and_renormalisation():
    p = np.array([[0.5, 0.25, 0.25], [0.7, 0.2, 0.1]])
    with jax.enable_x64(True):
        ours = xent_jax.entropy(p)  # axis=-1
        assert_close(ours, scipy.stats.entropy(p, axis=-1), np.float64)
        assert_close(ours, scipy.stats.entropy(p.T), np.float64)  # SciPy's default axis=0
        unnormalised = np.array([1.0, 1.0])
        assert float(xent_jax.entropy(unnormalised)) == 0.0  # used as given: -sum 1 log 1
    assert_close(scipy.stats.entropy(unnormalised), np.log(2), np.float64)  # renormalised


def test_scipy_entropy_of_two_distributions_is_kl_divergence():
    with jax.enable_x64(True):
        ours = xent_jax.kl_divergence(P, Q, base=2)
    assert_close(ours, scipy.stats.entropy(P, Q, base=2, axis=-1), np.float64)


def test_scipy_jensenshannon_is_the_square_root():
    with jax.enable_x64(True):
        ours = xent_jax.js_divergence(P, Q)
    distance = scipy.spatial.distance.jensenshannon(P, Q, axis=-1)
    assert_close(ours, distance**2, np.float64)


def test_scipy_special_elementwise_terms_summed():
    with jax.enable_x64(True):
        assert_close(xent_jax.entropy(P), scipy.special.entr(P).sum(-1), np.float64)
        assert_close(xent_jax.kl_divergence(P, Q), scipy.special.rel_entr(P, Q).sum(-1), np.float64)


def test_sklearn_log_loss_is_the_mean():
    with jax.enable_x64(True):
        probs = np.asarray(jax.nn.softmax(LOGITS.astype(np.float64)))
    expected = sklearn.metrics.log_loss(LABELS, probs, labels=range(5))
    with jax.enable_x64(True):
        integer = xent_jax.softmax_cross_entropy_with_integer_labels(
            LOGITS.astype(np.float64), LABELS, reduction="mean"
        )
        sparse = xent_jax.sparse_categorical_cross_entropy(probs, LABELS, reduction="mean")
    assert_close(integer, expected, np.float64)
    assert_close(sparse, expected, np.float64)
