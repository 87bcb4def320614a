"""Every loss from logits against the float64 NumPy references, optax and scikit-learn."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
import sklearn.metrics

import xent_jax
from tests import reference, registry
from tests.tolerances import assert_close

DTYPES = [np.float32, np.float64]
REDUCTIONS = ["none", "sum", "mean"]
NUM_CLASSES = 6
CLASS_WEIGHTS = np.array([0.5, 2.0, 1.0, 1.5, 0.25, 3.0])
# name -> (logits shape, class axis); every layout has NUM_CLASSES classes.
LAYOUTS = {
    "classes_last": ((5, NUM_CLASSES), -1),
    "torch_NCd": ((3, NUM_CLASSES, 4), 1),
    "classes_first": ((NUM_CLASSES, 5), 0),
}


def test_every_loss_has_a_float64_reference():
    assert set(registry.select()) <= set(reference.__all__)


# ---------------------------------------------------------------------------------------------
# Inputs.
# ---------------------------------------------------------------------------------------------


def _batch_shape(shape, axis):
    return tuple(s for i, s in enumerate(shape) if i != axis % len(shape))


def _logits(seed, shape, scale=3.0):
    return np.random.default_rng(seed).normal(size=shape) * scale


def _class_mask(seed, shape, axis):
    """Random class mask with at least two unmasked classes in every row."""
    rng = np.random.default_rng(seed)
    mask = np.moveaxis(rng.uniform(size=shape) < 0.6, axis, -1).copy()
    mask[..., :2] = True
    rng.permuted(mask, axis=-1, out=mask)
    return np.moveaxis(mask, -1, axis)


def _example_mask(seed, shape, axis):
    mask = np.random.default_rng(seed).uniform(size=_batch_shape(shape, axis)) < 0.7
    mask.flat[0] = True
    return mask


def _dense_labels(seed, shape, axis, class_mask=None):
    """Normalised soft labels with some exact zeros, with no mass on masked classes."""
    rng = np.random.default_rng(seed)
    raw = np.moveaxis(rng.gamma(0.8, size=shape), axis, -1)
    raw = np.where(rng.uniform(size=raw.shape) < 0.3, 0.0, raw)
    if class_mask is not None:
        raw = np.where(np.moveaxis(np.broadcast_to(class_mask, shape), axis, -1), raw, 0.0)
    first = np.argmax(
        np.moveaxis(np.ones(shape, bool) if class_mask is None else class_mask, axis, -1), -1
    )
    np.put_along_axis(raw, first[..., None], 1.0 + raw.max(), axis=-1)
    return np.moveaxis(raw / raw.sum(-1, keepdims=True), -1, axis)


def _integer_labels(seed, shape, axis, class_mask=None):
    """Integer labels of the batch shape, drawn among each row's unmasked classes."""
    rng = np.random.default_rng(seed)
    allowed = np.moveaxis(np.ones(shape, bool) if class_mask is None else class_mask, axis, -1)
    scores = np.where(allowed, rng.uniform(size=allowed.shape), -1.0)
    return np.argmax(scores, axis=-1).astype(np.int32)


def _resolve(options, shape, axis, seed):
    """Replaces the placeholders "class"/"example" of ``where`` by concrete masks."""
    options = dict(options)
    if options.get("where") == "class":
        options["where"] = _class_mask(seed, shape, axis)
    elif options.get("where") == "example":
        options["where"] = _example_mask(seed, shape, axis)
    return options


def _cast(value, dtype):
    """Float arrays are rounded to ``dtype``; everything else passes through."""
    if isinstance(value, np.ndarray) and value.dtype.kind == "f":
        return value.astype(dtype)
    return value


def _compare(name, dtype, args, kwargs):
    """Runs ``xent_jax.<name>`` and ``reference.<name>`` on the same (rounded) inputs."""
    args = [_cast(a, dtype) for a in args]
    kwargs = {k: _cast(v, dtype) for k, v in kwargs.items()}
    expected = getattr(reference, name)(*args, **kwargs)
    with jax.enable_x64(dtype == np.float64):
        out = getattr(xent_jax, name)(*args, **kwargs)
        assert out.dtype == dtype, (out.dtype, dtype)
        out = np.asarray(out, np.float64)
    assert out.shape == np.shape(expected), (out.shape, np.shape(expected))
    assert_close(out, expected, dtype, err_msg=str(kwargs))
    return out


# ---------------------------------------------------------------------------------------------
# Softmax cross-entropy, dense and integer labels.
# ---------------------------------------------------------------------------------------------

SOFTMAX_OPTIONS = {
    "plain": {},
    "smoothing": {"label_smoothing": 0.2},
    "class_weights": {"class_weights": CLASS_WEIGHTS},
    "z_loss": {"z_loss": 0.05},
    "softcap": {"logit_softcap": 2.5},
    "class_mask": {"where": "class"},
    "example_mask": {"where": "example"},
    "smoothing+class_mask": {"label_smoothing": 0.3, "where": "class"},
    "everything": {
        "label_smoothing": 0.1,
        "class_weights": CLASS_WEIGHTS,
        "z_loss": 0.01,
        "logit_softcap": 4.0,
        "where": "class",
    },
}
INTEGER_ONLY_OPTIONS = {
    "ignore_index": {"ignore_index": 2},
    "everything+ignore+example_mask": {
        "label_smoothing": 0.15,
        "class_weights": CLASS_WEIGHTS,
        "z_loss": 0.02,
        "logit_softcap": 5.0,
        "ignore_index": 0,
        "where": "example",
    },
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("option", sorted(SOFTMAX_OPTIONS))
def test_softmax_cross_entropy_matches_reference(option, layout, dtype):
    shape, axis = LAYOUTS[layout]
    kwargs = _resolve(SOFTMAX_OPTIONS[option], shape, axis, seed=1)
    class_mask = kwargs["where"] if kwargs.get("where", np.zeros(0)).ndim == len(shape) else None
    logits = _logits(2, shape)
    labels = _dense_labels(3, shape, axis, class_mask)
    for reduction in REDUCTIONS:
        _compare(
            "softmax_cross_entropy",
            dtype,
            (logits, labels),
            dict(kwargs, axis=axis, reduction=reduction),
        )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("option", sorted(SOFTMAX_OPTIONS | INTEGER_ONLY_OPTIONS))
def test_integer_label_cross_entropy_matches_reference(option, layout, dtype):
    shape, axis = LAYOUTS[layout]
    kwargs = _resolve((SOFTMAX_OPTIONS | INTEGER_ONLY_OPTIONS)[option], shape, axis, seed=4)
    class_mask = kwargs["where"] if kwargs.get("where", np.zeros(0)).ndim == len(shape) else None
    logits = _logits(5, shape)
    labels = _integer_labels(6, shape, axis, class_mask)
    for reduction in REDUCTIONS:
        _compare(
            "softmax_cross_entropy_with_integer_labels",
            dtype,
            (logits, labels),
            dict(kwargs, axis=axis, reduction=reduction),
        )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "kwargs",
    [{}, {"label_smoothing": 0.2, "class_weights": CLASS_WEIGHTS, "z_loss": 0.01}],
    ids=["plain", "options"],
)
def test_one_hot_dense_equals_integer_labels(kwargs, dtype):
    shape, axis = LAYOUTS["torch_NCd"]
    logits = _logits(7, shape).astype(dtype)
    labels = _integer_labels(8, shape, axis)
    one_hot = np.moveaxis(np.eye(NUM_CLASSES, dtype=dtype)[labels], -1, axis)
    kwargs = {k: _cast(v, dtype) for k, v in kwargs.items()}
    with jax.enable_x64(dtype == np.float64):
        for reduction in ("none", "sum"):
            dense = xent_jax.softmax_cross_entropy(
                logits, one_hot, axis=axis, reduction=reduction, **kwargs
            )
            sparse = xent_jax.softmax_cross_entropy_with_integer_labels(
                logits, labels, axis=axis, reduction=reduction, **kwargs
            )
            assert_close(dense, sparse, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad_label", [NUM_CLASSES, NUM_CLASSES + 3, -1, -7])
def test_invalid_integer_label_gives_nan_for_its_example_only(bad_label, dtype):
    logits = _logits(9, (4, NUM_CLASSES)).astype(dtype)
    labels = np.array([0, bad_label, 3, -100], np.int32)
    with jax.enable_x64(dtype == np.float64):
        out = np.asarray(
            xent_jax.softmax_cross_entropy_with_integer_labels(logits, labels, ignore_index=-100)
        )
    expected = reference.softmax_cross_entropy_with_integer_labels(
        logits, labels, ignore_index=-100
    )
    assert np.isnan(out[1]) and np.isnan(expected[1])
    keep = [0, 2, 3]
    assert_close(out[keep], expected[keep], dtype)
    assert out[3] == 0.0


# ---------------------------------------------------------------------------------------------
# -inf logits, fully masked rows and empty means.
# ---------------------------------------------------------------------------------------------

NEG_INF_LOGITS = np.array(
    [
        [1.0, -np.inf, 0.5, -np.inf],
        [-np.inf, -np.inf, -np.inf, -np.inf],
        [0.2, 0.3, -np.inf, 2.0],
        [0.0, 1.0, 2.0, 3.0],
    ]
)


@pytest.mark.parametrize("dtype", DTYPES)
def test_neg_inf_logits_with_zero_mass_stay_finite(dtype):
    labels = np.array(
        [[0.6, 0.0, 0.4, 0.0], [0.25, 0.25, 0.25, 0.25], [0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
    )
    for reduction in REDUCTIONS:
        out = _compare(
            "softmax_cross_entropy", dtype, (NEG_INF_LOGITS, labels), {"reduction": reduction}
        )
        assert np.all(np.isfinite(out))
    out = _compare(
        "softmax_cross_entropy_with_integer_labels",
        dtype,
        (NEG_INF_LOGITS, np.array([2, 0, 3, 1])),
        {"reduction": "mean"},
    )
    # The all -inf row is out of the mean: three valid examples.
    assert np.isfinite(out)


@pytest.mark.parametrize("dtype", DTYPES)
def test_label_on_neg_inf_logit_costs_inf(dtype):
    out = _compare(
        "softmax_cross_entropy_with_integer_labels",
        dtype,
        (NEG_INF_LOGITS, np.array([1, 0, 2, 1])),
        {},
    )
    assert out[0] == np.inf and out[1] == 0.0 and out[2] == np.inf
    labels = np.array(
        [[0.5, 0.5, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0]]
    )
    out = _compare("softmax_cross_entropy", dtype, (NEG_INF_LOGITS, labels), {})
    assert out[0] == np.inf and out[1] == 0.0 and out[2] == np.inf


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "name", ["softmax_cross_entropy", "softmax_cross_entropy_with_integer_labels"]
)
def test_neg_inf_logit_is_masked_vocabulary_for_label_smoothing(name, dtype):
    # Deliberate difference from torch, which gives inf for
    # F.cross_entropy([[1., -inf, .5]], [0], label_smoothing=.1): a -inf logit is masked
    # vocabulary, so it receives no smoothing mass, exactly as if `where` masked its class.
    logits = np.array([[1.0, -np.inf, 0.5]])
    labels = np.array([[1.0, 0.0, 0.0]]) if name == "softmax_cross_entropy" else np.array([0])
    masked = _compare(
        name,
        dtype,
        (logits, labels),
        {"label_smoothing": 0.1, "where": np.array([[True, False, True]])},
    )
    assert np.isfinite(masked[0])
    with jax.enable_x64(dtype == np.float64):
        unmasked = getattr(xent_jax, name)(logits.astype(dtype), labels, label_smoothing=0.1)
    assert_close(np.asarray(unmasked, np.float64), masked, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", registry.select(softmax=True))
def test_fully_masked_rows_cost_zero_and_leave_the_mean(name, dtype):
    logits = _logits(10, (4, NUM_CLASSES))
    class_mask = np.ones((4, NUM_CLASSES), bool)
    class_mask[1] = False
    integer = name.endswith("integer_labels")
    labels = np.array([0, 1, 2, 3]) if integer else np.eye(NUM_CLASSES)[[0, 1, 2, 3]]
    for reduction in REDUCTIONS:
        out = _compare(name, dtype, (logits, labels), {"where": class_mask, "reduction": reduction})
        if reduction == "none":
            assert out[1] == 0.0
    # Masking every example: the mean over nothing is 0.0, not NaN.
    for where in (np.zeros((4, NUM_CLASSES), bool), np.zeros(4, bool)):
        out = _compare(name, dtype, (logits, labels), {"where": where, "reduction": "mean"})
        assert out == 0.0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", registry.select(inputs="logits"))
def test_empty_batch(name, dtype):
    logits = np.zeros((0, NUM_CLASSES))
    if registry.REGISTRY[name].labels == "integer":
        labels = np.zeros((0,), np.int32)
    else:
        labels = np.zeros((0, NUM_CLASSES))
    for reduction in REDUCTIONS:
        out = _compare(name, dtype, (logits, labels), {"reduction": reduction})
        if reduction != "none":
            assert out == 0.0


# ---------------------------------------------------------------------------------------------
# Sigmoid losses.
# ---------------------------------------------------------------------------------------------

BCE_OPTIONS = {
    "plain": {},
    "pos_weight_per_column": {"pos_weight": np.array([0.5, 1.0, 2.0, 3.0, 0.25])},
    "pos_weight_scalar": {"pos_weight": 2.5},
    "smoothing": {"label_smoothing": 0.2},
    "mask": {"where": "elements"},
    "everything": {
        "pos_weight": np.array([0.5, 1.0, 2.0, 3.0, 0.25]),
        "label_smoothing": 0.1,
        "where": "rows",
    },
}


def _bce_inputs(seed):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(4, 5)) * 4.0
    labels = np.where(
        rng.uniform(size=(4, 5)) < 0.5, rng.integers(0, 2, (4, 5)), rng.uniform(0, 1, (4, 5))
    )
    masks = {
        "elements": rng.uniform(size=(4, 5)) < 0.6,
        "rows": np.array([[True], [False], [True], [True]]),
    }
    return logits, labels.astype(np.float64), masks


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("option", sorted(BCE_OPTIONS))
def test_sigmoid_binary_cross_entropy_matches_reference(option, dtype):
    logits, labels, masks = _bce_inputs(11)
    kwargs = dict(BCE_OPTIONS[option])
    if "where" in kwargs:
        kwargs["where"] = masks[kwargs["where"]]
    for reduction in REDUCTIONS:
        _compare(
            "sigmoid_binary_cross_entropy",
            dtype,
            (logits, labels),
            dict(kwargs, reduction=reduction),
        )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("alpha", [None, 0.25, 0.8])
@pytest.mark.parametrize("gamma", [0.0, 1.0, 2.0, 3.5])
def test_sigmoid_focal_loss_matches_reference(gamma, alpha, dtype):
    logits, labels, masks = _bce_inputs(12)
    for reduction in REDUCTIONS:
        for where in (None, masks["elements"]):
            _compare(
                "sigmoid_focal_loss",
                dtype,
                (logits, labels),
                {"alpha": alpha, "gamma": gamma, "where": where, "reduction": reduction},
            )


@pytest.mark.parametrize("dtype", DTYPES)
def test_sigmoid_losses_at_extreme_logits(dtype):
    logits = np.array([-1e4, -100.0, -20.0, 0.0, 20.0, 100.0, 1e4])
    for labels in (np.zeros(7), np.ones(7), np.full(7, 0.3)):
        out = _compare("sigmoid_binary_cross_entropy", dtype, (logits, labels), {})
        assert np.all(np.isfinite(out))
        _compare("sigmoid_focal_loss", dtype, (logits, labels), {"gamma": 2.0})


# ---------------------------------------------------------------------------------------------
# Softmax focal and poly losses.
# ---------------------------------------------------------------------------------------------

FOCAL_OPTIONS = {
    "gamma0": {"gamma": 0.0},
    "default": {},
    "alpha_scalar": {"alpha": 0.25, "gamma": 1.5},
    "alpha_per_class": {"alpha": np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6]), "gamma": 3.0},
    "class_mask": {"where": "class"},
    "example_mask": {"where": "example", "alpha": 0.5},
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["classes_last", "torch_NCd"])
@pytest.mark.parametrize("option", sorted(FOCAL_OPTIONS))
def test_softmax_focal_losses_match_reference(option, layout, dtype):
    shape, axis = LAYOUTS[layout]
    kwargs = _resolve(FOCAL_OPTIONS[option], shape, axis, seed=13)
    class_mask = kwargs["where"] if kwargs.get("where", np.zeros(0)).ndim == len(shape) else None
    logits = _logits(14, shape)
    dense = _dense_labels(15, shape, axis, class_mask)
    integer = _integer_labels(16, shape, axis, class_mask)
    for reduction in REDUCTIONS:
        options = dict(kwargs, axis=axis, reduction=reduction)
        _compare("softmax_focal_loss", dtype, (logits, dense), options)
        _compare("softmax_focal_loss_with_integer_labels", dtype, (logits, integer), options)
        _compare(
            "softmax_focal_loss_with_integer_labels",
            dtype,
            (logits, integer),
            dict(options, ignore_index=int(integer.flat[1])),
        )


@pytest.mark.parametrize("dtype", DTYPES)
def test_focal_with_gamma_zero_is_cross_entropy(dtype):
    shape, axis = LAYOUTS["torch_NCd"]
    logits = _logits(17, shape).astype(dtype)
    labels = _dense_labels(18, shape, axis).astype(dtype)
    with jax.enable_x64(dtype == np.float64):
        focal = xent_jax.softmax_focal_loss(logits, labels, axis=axis, gamma=0.0)
        ce = xent_jax.softmax_cross_entropy(logits, labels, axis=axis)
        assert_close(focal, ce, dtype)


POLY_OPTIONS = {
    "default": {},
    "epsilon": {"epsilon": -0.5},
    "smoothing": {"epsilon": 1.0, "label_smoothing": 0.2},
    "class_mask": {"where": "class", "label_smoothing": 0.1},
    "example_mask": {"where": "example"},
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("option", sorted(POLY_OPTIONS))
def test_poly_loss_matches_reference(option, layout, dtype):
    shape, axis = LAYOUTS[layout]
    kwargs = _resolve(POLY_OPTIONS[option], shape, axis, seed=19)
    class_mask = kwargs["where"] if kwargs.get("where", np.zeros(0)).ndim == len(shape) else None
    logits = _logits(20, shape)
    labels = _dense_labels(21, shape, axis, class_mask)
    for reduction in REDUCTIONS:
        _compare(
            "poly_loss_cross_entropy",
            dtype,
            (logits, labels),
            dict(kwargs, axis=axis, reduction=reduction),
        )


# ---------------------------------------------------------------------------------------------
# optax, for the subset both libraries share.
# ---------------------------------------------------------------------------------------------


def _optax_pairs():
    """(name, xent_jax call, optax call, inputs maker) for the shared, option-free subset."""
    rng = np.random.default_rng(22)
    logits = rng.normal(size=(3, 4, NUM_CLASSES)) * 3.0
    soft = _dense_labels(23, logits.shape, -1)
    integer = _integer_labels(24, logits.shape, -1)
    binary = rng.uniform(size=logits.shape)
    mask = _class_mask(25, logits.shape, -1)
    soft_masked = _dense_labels(26, logits.shape, -1, mask)
    integer_masked = _integer_labels(27, logits.shape, -1, mask)
    losses = optax.losses
    return {
        "softmax_cross_entropy": (
            lambda z: xent_jax.softmax_cross_entropy(z, soft),
            lambda z: losses.softmax_cross_entropy(z, soft),
        ),
        "softmax_cross_entropy/class_mask": (
            lambda z: xent_jax.softmax_cross_entropy(z, soft_masked, where=mask),
            lambda z: losses.softmax_cross_entropy(z, soft_masked, where=mask),
        ),
        "softmax_cross_entropy/axis0": (
            lambda z: xent_jax.softmax_cross_entropy(z, soft, axis=0),
            lambda z: losses.softmax_cross_entropy(z, soft, axis=0),
        ),
        "integer_labels": (
            lambda z: xent_jax.softmax_cross_entropy_with_integer_labels(z, integer),
            lambda z: losses.softmax_cross_entropy_with_integer_labels(z, integer),
        ),
        "integer_labels/class_mask": (
            lambda z: xent_jax.softmax_cross_entropy_with_integer_labels(
                z, integer_masked, where=mask
            ),
            lambda z: losses.softmax_cross_entropy_with_integer_labels(
                z, integer_masked, where=mask
            ),
        ),
        "sigmoid_binary_cross_entropy": (
            lambda z: xent_jax.sigmoid_binary_cross_entropy(z, binary),
            lambda z: losses.sigmoid_binary_cross_entropy(z, binary),
        ),
        "sigmoid_focal_loss": (
            lambda z: xent_jax.sigmoid_focal_loss(z, binary),
            lambda z: losses.sigmoid_focal_loss(z, binary),
        ),
        "sigmoid_focal_loss/alpha": (
            lambda z: xent_jax.sigmoid_focal_loss(z, binary, alpha=0.3, gamma=1.5),
            lambda z: losses.sigmoid_focal_loss(z, binary, alpha=0.3, gamma=1.5),
        ),
        "poly_loss_cross_entropy": (
            lambda z: xent_jax.poly_loss_cross_entropy(z, soft),
            lambda z: losses.poly_loss_cross_entropy(z, soft),
        ),
        "poly_loss_cross_entropy/epsilon": (
            lambda z: xent_jax.poly_loss_cross_entropy(z, soft, epsilon=-0.7),
            lambda z: losses.poly_loss_cross_entropy(z, soft, epsilon=-0.7),
        ),
        "poly_loss_cross_entropy/class_mask": (
            lambda z: xent_jax.poly_loss_cross_entropy(z, soft_masked, where=mask),
            lambda z: losses.poly_loss_cross_entropy(z, soft_masked, where=mask),
        ),
    }, logits


OPTAX_PAIRS, OPTAX_LOGITS = _optax_pairs()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pair", sorted(OPTAX_PAIRS))
def test_matches_optax(pair, dtype):
    ours, theirs = OPTAX_PAIRS[pair]
    with jax.enable_x64(dtype == np.float64):
        logits = OPTAX_LOGITS.astype(dtype)
        assert_close(ours(logits), theirs(logits), dtype)


# ---------------------------------------------------------------------------------------------
# scikit-learn's log_loss.
# ---------------------------------------------------------------------------------------------


def test_integer_cross_entropy_mean_is_sklearn_log_loss():
    rng = np.random.default_rng(28)
    logits = rng.normal(size=(12, 4)) * 2.0
    labels = rng.integers(0, 4, size=12)
    probs = np.exp(reference.masked_log_softmax(logits)[0])
    with jax.enable_x64(True):
        out = xent_jax.softmax_cross_entropy_with_integer_labels(logits, labels, reduction="mean")
        assert_close(out, sklearn.metrics.log_loss(labels, probs, labels=range(4)), np.float64)
        # torch's weighted mean is log_loss with sample_weight = class_weights[label].
        weights = np.array([0.5, 2.0, 1.0, 1.5])
        out = xent_jax.softmax_cross_entropy_with_integer_labels(
            logits, labels, class_weights=weights, reduction="mean"
        )
        expected = sklearn.metrics.log_loss(
            labels, probs, sample_weight=weights[labels], labels=range(4)
        )
        assert_close(out, expected, np.float64)
        dense = xent_jax.softmax_cross_entropy(logits, np.eye(4)[labels], reduction="sum")
        assert_close(
            dense,
            sklearn.metrics.log_loss(labels, probs, normalize=False, labels=range(4)),
            np.float64,
        )


def test_sigmoid_bce_mean_is_sklearn_binary_log_loss():
    rng = np.random.default_rng(29)
    logits = rng.normal(size=20) * 3.0
    labels = rng.integers(0, 2, size=20)
    probs = np.exp(reference.log_sigmoid(logits))
    with jax.enable_x64(True):
        out = xent_jax.sigmoid_binary_cross_entropy(
            logits, labels.astype(np.float64), reduction="mean"
        )
    assert_close(out, sklearn.metrics.log_loss(labels, probs), np.float64)


# ---------------------------------------------------------------------------------------------
# Half precision is computed in float32.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("half", [jax.numpy.bfloat16, jax.numpy.float16])
def test_half_precision_logits_return_float32_losses(half):
    logits = np.asarray(jax.numpy.asarray(_logits(30, (4, NUM_CLASSES)), half))
    as_f64 = np.asarray(logits, np.float64)
    labels = _integer_labels(31, (4, NUM_CLASSES), -1)
    out = xent_jax.softmax_cross_entropy_with_integer_labels(logits, labels)
    assert out.dtype == np.float32
    assert_close(
        out, reference.softmax_cross_entropy_with_integer_labels(as_f64, labels), np.float32
    )
    binary = np.random.default_rng(32).uniform(size=(4, NUM_CLASSES))
    out = xent_jax.sigmoid_binary_cross_entropy(logits, binary.astype(np.float32))
    assert out.dtype == np.float32
    assert_close(
        out, reference.sigmoid_binary_cross_entropy(as_f64, binary.astype(np.float32)), np.float32
    )
