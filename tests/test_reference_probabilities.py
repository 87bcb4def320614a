"""Losses from probabilities against the Keras formulas (``from_logits=False``).

Keras renormalises categorical predictions along the class axis, THEN clips them to
``[eps, 1 - eps]``; binary predictions are clipped only. The float64 references live in
``tests/reference.py``; the published Keras examples are checked against closed forms.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import sklearn.metrics

import xent_jax
from tests import reference
from tests.tolerances import assert_close

DTYPES = [np.float32, np.float64]
REDUCTIONS = ["none", "sum", "mean"]


def _cast(value, dtype):
    if isinstance(value, np.ndarray) and value.dtype.kind == "f":
        return value.astype(dtype)
    return value


def _compare(name, dtype, probs, labels, **kwargs):
    """``xent_jax.<name>`` vs ``reference.<name>`` on the same inputs rounded to ``dtype``."""
    probs, labels = _cast(probs, dtype), _cast(labels, dtype)
    kwargs = {k: _cast(v, dtype) for k, v in kwargs.items()}
    expected = getattr(reference, name)(probs, labels, **kwargs)
    with jax.enable_x64(dtype == np.float64):
        out = getattr(xent_jax, name)(probs, labels, **kwargs)
        assert out.dtype == dtype, (out.dtype, dtype)
        out = np.asarray(out, np.float64)
    assert out.shape == np.shape(expected)
    assert_close(out, expected, dtype, err_msg=str(kwargs))
    return out


def _probabilities(seed, shape, axis=-1, normalised=True):
    rng = np.random.default_rng(seed)
    raw = rng.gamma(1.0, size=shape) + 0.05
    return raw / raw.sum(axis=axis, keepdims=True) if normalised else raw


# ---------------------------------------------------------------------------------------------
# Published Keras examples.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_keras_documented_binary_example(dtype):
    # keras.losses.binary_crossentropy([[0, 1], [0, 0]], [[0.6, 0.4], [0.4, 0.6]])
    # -> array([0.916, 0.714]): the per-row mean over the last axis.
    probs = np.array([[0.6, 0.4], [0.4, 0.6]], dtype)
    labels = np.array([[0.0, 1.0], [0.0, 0.0]], dtype)
    exact = [-np.log(0.4), -(np.log(0.6) + np.log(0.4)) / 2]
    with jax.enable_x64(dtype == np.float64):
        rows = [
            float(xent_jax.binary_cross_entropy(p, y, reduction="mean"))
            for p, y in zip(probs, labels, strict=True)
        ]
        elementwise = np.asarray(xent_jax.binary_cross_entropy(probs, labels), np.float64)
    assert_close(rows, exact, dtype)
    np.testing.assert_array_equal(np.round(rows, 3), [0.916, 0.714])
    assert_close(elementwise.mean(-1), exact, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_keras_documented_ops_binary_example(dtype):
    # keras.ops.binary_crossentropy([0, 1, 1, 0], [0.1, 0.9, 0.8, 0.2])
    # -> [0.10536054, 0.10536054, 0.22314355, 0.22314355]
    out = _compare(
        "binary_cross_entropy",
        dtype,
        np.array([0.1, 0.9, 0.8, 0.2]),
        np.array([0.0, 1.0, 1.0, 0.0]),
    )
    exact = -np.log([0.9, 0.9, 0.8, 0.8])
    assert_close(out, exact, dtype)
    # Keras printed its float32 result, so the doc agrees with the formula to float32 precision.
    documented = [0.10536054, 0.10536054, 0.22314355, 0.22314355]
    assert_close(documented, exact, np.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_keras_documented_categorical_examples(dtype):
    # keras.losses.categorical_crossentropy([[0, 1, 0], [0, 0, 1]],
    #     [[0.05, 0.95, 0], [0.1, 0.8, 0.1]]) -> [0.0513, 2.303]; the sparse twin with labels
    # [1, 2] gives the same; CategoricalCrossentropy() (mean) gives 1.177.
    probs = np.array([[0.05, 0.95, 0.0], [0.1, 0.8, 0.1]])
    one_hot = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    exact = [-np.log(0.95), -np.log(0.1)]
    out = _compare("categorical_cross_entropy", dtype, probs, one_hot)
    assert_close(out, exact, dtype)
    np.testing.assert_array_equal(np.round(out, 3), [0.051, 2.303])
    out = _compare("sparse_categorical_cross_entropy", dtype, probs, np.array([1, 2]))
    assert_close(out, exact, dtype)
    mean = _compare("categorical_cross_entropy", dtype, probs, one_hot, reduction="mean")
    assert_close(mean, np.mean(exact), dtype)
    assert round(float(mean), 3) == 1.177


# ---------------------------------------------------------------------------------------------
# Against the float64 references, options on and off.
# ---------------------------------------------------------------------------------------------

BINARY_OPTIONS = {
    "plain": {},
    "smoothing": {"label_smoothing": 0.2},
    "eps": {"eps": 1e-3},
    "mask": {"where": "elements"},
    "everything": {"label_smoothing": 0.1, "eps": 1e-4, "where": "rows"},
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("option", sorted(BINARY_OPTIONS))
def test_binary_cross_entropy_matches_reference(option, dtype):
    rng = np.random.default_rng(1)
    probs = rng.uniform(size=(4, 5))
    probs[0, :2] = [0.0, 1e-9]  # below the clip
    labels = np.where(rng.uniform(size=(4, 5)) < 0.5, rng.integers(0, 2, (4, 5)), probs)
    masks = {
        "elements": rng.uniform(size=(4, 5)) < 0.6,
        "rows": np.array([[True], [False], [True], [True]]),
    }
    kwargs = dict(BINARY_OPTIONS[option])
    if "where" in kwargs:
        kwargs["where"] = masks[kwargs["where"]]
    for reduction in REDUCTIONS:
        _compare(
            "binary_cross_entropy",
            dtype,
            probs,
            labels.astype(np.float64),
            reduction=reduction,
            **kwargs,
        )


CATEGORICAL_OPTIONS = {
    "plain": {},
    "smoothing": {"label_smoothing": 0.25},
    "eps": {"eps": 1e-3},
    "example_mask": {"where": "examples"},
    "everything": {"label_smoothing": 0.1, "eps": 1e-5, "where": "examples"},
}
# name -> (shape, class axis)
LAYOUTS = {"classes_last": ((4, 5), -1), "torch_NCd": ((2, 5, 3), 1)}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("normalised", [True, False], ids=["normalised", "unnormalised"])
@pytest.mark.parametrize("option", sorted(CATEGORICAL_OPTIONS))
def test_categorical_losses_match_reference(option, normalised, layout, dtype):
    shape, axis = LAYOUTS[layout]
    rng = np.random.default_rng(2)
    probs = _probabilities(3, shape, axis, normalised)
    labels = _probabilities(4, shape, axis)
    batch_shape = tuple(s for i, s in enumerate(shape) if i != axis % len(shape))
    integer = rng.integers(0, shape[axis], size=batch_shape)
    kwargs = dict(CATEGORICAL_OPTIONS[option])
    if "where" in kwargs:
        kwargs["where"] = rng.uniform(size=batch_shape) < 0.6
    sparse_kwargs = {k: v for k, v in kwargs.items() if k != "label_smoothing"}
    for reduction in REDUCTIONS:
        _compare(
            "categorical_cross_entropy",
            dtype,
            probs,
            labels,
            axis=axis,
            reduction=reduction,
            **kwargs,
        )
        _compare(
            "sparse_categorical_cross_entropy",
            dtype,
            probs,
            integer,
            axis=axis,
            reduction=reduction,
            **sparse_kwargs,
        )


@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse_ignore_index_and_invalid_labels(dtype):
    probs = _probabilities(5, (5, 4))
    labels = np.array([0, -1, 3, 4, 2])
    out = _compare("sparse_categorical_cross_entropy", dtype, probs, labels, ignore_index=-1)
    assert out[1] == 0.0 and np.isnan(out[3])
    assert np.all(np.isfinite(out[[0, 2, 4]]))
    labels = np.array([0, -1, 3, 1, 2])
    mean = _compare(
        "sparse_categorical_cross_entropy", dtype, probs, labels, ignore_index=-1, reduction="mean"
    )
    per_example = reference.sparse_categorical_cross_entropy(probs.astype(dtype), labels)
    assert_close(mean, per_example[[0, 2, 3, 4]].mean(), dtype)
    none_valid = _compare(
        "sparse_categorical_cross_entropy",
        dtype,
        probs,
        np.full(5, -1),
        ignore_index=-1,
        reduction="mean",
    )
    assert none_valid == 0.0


# ---------------------------------------------------------------------------------------------
# Renormalise-then-clip order and the clip edges.
# ---------------------------------------------------------------------------------------------


def test_renormalise_happens_before_clipping():
    # Scaled predictions renormalise to [0.25, 0.75, 0]; the zero is clipped to eps AFTER the
    # renormalisation, so it costs -log(eps), and scaling the input changes nothing.
    probs = np.array([[0.5, 1.5, 0.0], [0.25, 0.75, 0.0]])
    labels = np.array([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    with jax.enable_x64(True):
        out = np.asarray(xent_jax.categorical_cross_entropy(probs, labels, eps=1e-7))
        sparse = np.asarray(xent_jax.sparse_categorical_cross_entropy(probs, np.array([1, 1])))
    assert_close(out, [-np.log(1e-7)] * 2, np.float64)
    assert_close(sparse, [-np.log(0.75)] * 2, np.float64)
    # Clipping first would give the unclipped 1.5 -> 1 - eps and a different renormalisation.
    clip_first = np.clip(probs[0], 1e-7, 1 - 1e-7)
    assert abs(-np.log(clip_first[1] / clip_first.sum()) - sparse[0]) > 1e-3


def test_clip_edges_in_float64():
    # Exact edges: p = 0 and p = 1 are clipped to eps and 1 - eps. (In float32, 1 - 1e-7 rounds
    # to 1 - 1.19e-7, so the top edge is only checked in float64.)
    probs = np.array([0.0, 1.0, 0.0, 1.0])
    labels = np.array([1.0, 0.0, 0.0, 1.0])
    out = _compare("binary_cross_entropy", np.float64, probs, labels, eps=1e-7)
    assert_close(out[:2], -np.log(1e-7), np.float64)
    assert_close(out[2:], -np.log1p(-1e-7), np.float64)


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_prediction_on_true_class_costs_minus_log_eps(dtype):
    probs = np.array([[0.0, 0.3, 0.7]])
    one_hot = np.array([[1.0, 0.0, 0.0]])
    for eps in (1e-7, 1e-3):
        out = _compare("categorical_cross_entropy", dtype, probs, one_hot, eps=eps)
        assert_close(out, [-np.log(np.asarray(eps, dtype))], dtype)
        out = _compare("sparse_categorical_cross_entropy", dtype, probs, np.array([0]), eps=eps)
        assert_close(out, [-np.log(np.asarray(eps, dtype))], dtype)


# ---------------------------------------------------------------------------------------------
# Agreement with scikit-learn and between the three APIs.
# ---------------------------------------------------------------------------------------------


def test_means_match_sklearn_log_loss():
    probs = _probabilities(6, (10, 4))
    labels = np.random.default_rng(7).integers(0, 4, size=10)
    with jax.enable_x64(True):
        sparse = xent_jax.sparse_categorical_cross_entropy(probs, labels, reduction="mean")
        dense = xent_jax.categorical_cross_entropy(probs, np.eye(4)[labels], reduction="mean")
        binary = xent_jax.binary_cross_entropy(
            probs[:, 0], (labels == 0).astype(np.float64), reduction="mean"
        )
    expected = sklearn.metrics.log_loss(labels, probs, labels=range(4))
    assert_close(sparse, expected, np.float64)
    assert_close(dense, expected, np.float64)
    expected = sklearn.metrics.log_loss(labels == 0, probs[:, 0])
    assert_close(binary, expected, np.float64)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse_equals_categorical_on_one_hot(dtype):
    shape, axis = LAYOUTS["torch_NCd"]
    probs = _probabilities(8, shape, axis, normalised=False).astype(dtype)
    labels = np.random.default_rng(9).integers(0, shape[axis], size=(2, 3))
    one_hot = np.moveaxis(np.eye(shape[axis], dtype=dtype)[labels], -1, axis)
    with jax.enable_x64(dtype == np.float64):
        for reduction in REDUCTIONS:
            assert_close(
                xent_jax.sparse_categorical_cross_entropy(
                    probs, labels, axis=axis, reduction=reduction
                ),
                xent_jax.categorical_cross_entropy(probs, one_hot, axis=axis, reduction=reduction),
                dtype,
            )
