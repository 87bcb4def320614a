"""Errors of xent_jax: trace-time checks that name the argument and show shapes/dtypes, invalid
integer labels that turn only their own example into NaN, and the opt-in hard error
(``validate_integer_labels`` + ``checked``) that names the offending value and position."""

from __future__ import annotations

import contextlib
import inspect
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import xent_jax
from tests import registry
from tests.tolerances import assert_close

K = 4
IGNORE = -100


@contextlib.contextmanager
def raises(exception, *patterns):
    """``pytest.raises`` that requires every regex of ``patterns`` in the message."""
    with pytest.raises(exception) as info:
        yield info
    message = str(info.value)
    for pattern in patterns:
        assert re.search(pattern, message), f"{pattern!r} not found in {message!r}"


def shape(*dims):
    """Regex for a shape written as a tuple ``(2, 4)`` / ``(3,)`` or a list ``[2, 4]``."""
    if len(dims) == 1:
        return rf"(\({dims[0]},\)|\[{dims[0]}\])"
    inner = r",\s*".join(str(d) for d in dims)
    return rf"(\({inner}\)|\[{inner}\])"


def _rng():
    return np.random.default_rng(0)


def _float(*dims):
    return _rng().uniform(0.1, 0.9, dims).astype(np.float32)


# Losses whose first two arguments must have the same shape: name -> name of argument two.
SAME_SHAPE = {
    name: registry.REGISTRY[name].second
    for name in registry.select(labels=("dense", "binary", "distribution"))
}
INTEGER_API = registry.select(labels="integer")
LOGITS_LOSSES = registry.select(inputs="logits")
WITH_REDUCTION = registry.select(reduces=True)
WITH_LABEL_SMOOTHING = registry.select(accepts="label_smoothing")


def test_registry_lists_every_option_of_every_loss():
    for name, loss in registry.REGISTRY.items():
        parameters = inspect.signature(loss.fn).parameters.values()
        keyword_only = {p.name for p in parameters if p.kind == p.KEYWORD_ONLY}
        assert keyword_only == set(loss.options), name


def valid_inputs(name, batch=2):
    """A valid (first, second) argument pair of shape [batch, K] (labels [batch] if integer)."""
    first = _float(batch, K)
    if name in INTEGER_API:
        return first, np.arange(batch, dtype=np.int32) % K
    return first, _float(batch, K)


@pytest.mark.parametrize("name", list(SAME_SHAPE))
def test_mismatched_shapes(name):
    second = SAME_SHAPE[name]
    with raises(ValueError, second, shape(2, 3), shape(2, 4)):
        getattr(xent_jax, name)(_float(2, 3), _float(2, 4))


@pytest.mark.parametrize("name", INTEGER_API)
def test_integer_labels_of_wrong_shape(name):
    with raises(ValueError, "labels", shape(3), shape(2)):
        getattr(xent_jax, name)(_float(2, K), np.zeros(3, np.int32))


@pytest.mark.parametrize("name", INTEGER_API)
def test_integer_labels_must_drop_the_class_axis(name):
    # Class axis 1 (PyTorch layout [N, K, T]): labels must be [N, T] = (2, 5), not (2, K).
    with raises(ValueError, "labels", shape(2, K), shape(2, 5)):
        getattr(xent_jax, name)(_float(2, K, 5), np.zeros((2, K), np.int32), axis=1)


@pytest.mark.parametrize("name", INTEGER_API)
def test_float_labels_for_integer_api(name):
    with raises(TypeError, "labels", "float32"):
        getattr(xent_jax, name)(_float(2, K), np.array([0.0, 1.0], np.float32))


@pytest.mark.parametrize("name", LOGITS_LOSSES)
def test_integer_logits(name):
    _, labels = valid_inputs(name)
    with raises(TypeError, "logits", "int32"):
        getattr(xent_jax, name)(np.ones((2, K), np.int32), labels)


@pytest.mark.parametrize("name", WITH_REDUCTION)
def test_unknown_reduction(name):
    first, second = valid_inputs(name)
    with raises(ValueError, "reduction", "avg"):
        getattr(xent_jax, name)(first, second, reduction="avg")


@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5])
@pytest.mark.parametrize("name", WITH_LABEL_SMOOTHING)
def test_label_smoothing_outside_unit_interval(name, value):
    first, second = valid_inputs(name)
    with raises(ValueError, "label_smoothing", re.escape(repr(value))):
        getattr(xent_jax, name)(first, second, label_smoothing=value)


@pytest.mark.parametrize("weights_shape", [(K + 1,), (K - 1,), (1, K)], ids=str)
@pytest.mark.parametrize("name", registry.select(accepts="class_weights"))
def test_class_weights_of_wrong_shape(name, weights_shape):
    first, second = valid_inputs(name)
    with raises(ValueError, "class_weights", shape(*weights_shape), str(K)):
        getattr(xent_jax, name)(first, second, class_weights=np.ones(weights_shape, np.float32))


WITH_WHERE = registry.select(accepts="where")


@pytest.mark.parametrize("where_shape", [(5,), (2, K + 1)], ids=str)
@pytest.mark.parametrize("name", WITH_WHERE)
def test_where_of_wrong_shape(name, where_shape):
    first, second = valid_inputs(name)
    args = (first,) if name == "entropy" else (first, second)
    with raises(ValueError, "where", shape(*where_shape)):
        getattr(xent_jax, name)(*args, where=np.ones(where_shape, bool))


# --------------------------------------------------------------------------------------------
# Invalid integer label values: NaN for their own example only, never a wrapped index.
# --------------------------------------------------------------------------------------------

LOGITS = np.random.default_rng(1).normal(size=(5, K)).astype(np.float32)
BAD_LABELS = np.array([0, K, -1, 3, 2], np.int32)  # K and -1 are invalid
BAD = np.array([False, True, True, False, False])


@pytest.mark.parametrize("ignore_index", [None, IGNORE])
@pytest.mark.parametrize("name", INTEGER_API)
def test_invalid_label_gives_nan_for_its_example_only(name, ignore_index):
    fn = getattr(xent_jax, name)
    first = LOGITS if name != "sparse_categorical_cross_entropy" else jax.nn.softmax(LOGITS)
    labels = BAD_LABELS.copy()
    kwargs = {}
    if ignore_index is not None:
        labels[4] = ignore_index  # -1 stays invalid although another value is ignored
        kwargs["ignore_index"] = ignore_index

    @jax.jit
    def evaluate(x, labels):
        return (
            {r: fn(x, labels, **kwargs, reduction=r) for r in ("none", "sum", "mean")},
            jax.grad(lambda x: jnp.sum(fn(x, labels, **kwargs)))(x),
        )

    values, grad = evaluate(jnp.asarray(first), labels)
    good, grad_good = evaluate(jnp.asarray(first[~BAD]), labels[~BAD])
    assert np.all(np.isnan(values["none"][BAD]))
    assert_close(values["none"][~BAD], good["none"])
    if ignore_index is not None:
        assert values["none"][4] == 0.0
    # Loud reductions: the NaN is not averaged away.
    assert np.isnan(values["sum"])
    assert np.isnan(values["mean"])
    # Gradients: the valid rows are those of the valid examples alone.
    assert_close(np.asarray(grad)[~BAD], grad_good)


def test_minus_one_is_nan_where_optax_wraps_to_the_last_class():
    labels = np.array([-1, 1], np.int32)
    wrapped = optax.softmax_cross_entropy_with_integer_labels(LOGITS[:2], labels)
    last_class = optax.softmax_cross_entropy_with_integer_labels(
        LOGITS[:2], np.array([K - 1, 1], np.int32)
    )
    # optax silently scores label -1 as class K - 1 ...
    assert_close(wrapped, last_class)
    assert np.isfinite(wrapped[0])
    # ... xent_jax makes it loud.
    ours = xent_jax.softmax_cross_entropy_with_integer_labels(LOGITS[:2], labels)
    assert np.isnan(ours[0])
    assert_close(ours[1], last_class[1])


# --------------------------------------------------------------------------------------------
# The hard error: validate_integer_labels inside a function wrapped by checked.
# --------------------------------------------------------------------------------------------


def _validated_loss(logits, labels, ignore_index=None):
    labels = xent_jax.validate_integer_labels(labels, logits.shape[-1], ignore_index=ignore_index)
    return xent_jax.softmax_cross_entropy_with_integer_labels(
        logits, labels, ignore_index=ignore_index
    )


CHECKED_VARIANTS = {
    "eager": xent_jax.checked(_validated_loss),
    "jit": xent_jax.checked(jax.jit(_validated_loss, static_argnames="ignore_index")),
}


@pytest.mark.parametrize("variant", list(CHECKED_VARIANTS))
@pytest.mark.parametrize(
    ("labels", "value", "position"),
    [
        (np.array([0, 1, 7, 2, 3], np.int32), "7", shape(2)),
        (np.array([0, 1, 2, 3, -3], np.int32), "-3", shape(4)),
        (np.array([0, 1, 2, 3, 4], np.int32), str(K), shape(4)),
    ],
    ids=["too_large", "negative", "equal_to_K"],
)
def test_checked_raises_naming_value_and_position(variant, labels, value, position):
    with raises(ValueError, "labels", rf"(?<![\d-]){value}(?!\d)", position):
        CHECKED_VARIANTS[variant](LOGITS, labels)


@pytest.mark.parametrize("variant", list(CHECKED_VARIANTS))
def test_checked_reports_position_in_two_dimensional_labels(variant):
    logits = np.random.default_rng(2).normal(size=(2, 3, K)).astype(np.float32)
    labels = np.array([[0, 1, 2], [3, 0, 9]], np.int32)
    with raises(ValueError, "labels", r"(?<!\d)9(?!\d)", r"[\(\[]1,?\s*2[\)\]]"):
        CHECKED_VARIANTS[variant](logits, labels)


@pytest.mark.parametrize("variant", list(CHECKED_VARIANTS))
def test_checked_passes_valid_and_ignored_labels_through(variant):
    labels = np.array([0, IGNORE, 3, 2, 1], np.int32)
    got = CHECKED_VARIANTS[variant](LOGITS, labels, ignore_index=IGNORE)
    expected = xent_jax.softmax_cross_entropy_with_integer_labels(
        LOGITS, labels, ignore_index=IGNORE
    )
    assert_close(got, expected)
    # The ignored value is allowed only when declared.
    with raises(ValueError, str(IGNORE)):
        CHECKED_VARIANTS[variant](LOGITS, labels)


# --------------------------------------------------------------------------------------------
# The closed-form gradients check their inputs as the losses do.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", registry.select(analytic=True, softmax=True))
def test_analytic_gradients_reject_what_the_losses_reject(name):
    grad_fn, loss_fn = registry.REGISTRY[name].grad_fn, registry.REGISTRY[name].fn
    logits, labels = valid_inputs(name, batch=3)
    bad_labels = np.zeros(1, np.int32) if name in INTEGER_API else _float(1, K)
    cases = [
        ((logits, bad_labels), {}, ValueError, ["labels", shape(*bad_labels.shape)]),
        ((logits, labels), {"class_weights": np.ones(K - 1)}, ValueError, ["class_weights"]),
        ((logits, labels), {"where": np.ones(3, np.float32)}, TypeError, ["where", "float32"]),
        ((logits, labels), {"label_smoothing": 1.5}, ValueError, ["label_smoothing"]),
        ((logits, labels), {"z_loss": -1.0}, ValueError, ["z_loss"]),
    ]
    if name in INTEGER_API:
        cases.append(((logits, labels.astype(np.float32)), {}, TypeError, ["labels", "float32"]))
    for args, kwargs, exception, patterns in cases:
        for fn in (loss_fn, grad_fn):
            with raises(exception, *patterns):
                fn(*args, **kwargs)


def test_analytic_sigmoid_gradient_rejects_what_the_loss_rejects():
    logits = _float(2, K)
    for kwargs, exception, patterns in [
        ({"labels": _float(3, K)}, ValueError, ["labels", shape(3, K), shape(2, K)]),
        ({"labels": _float(2, K), "where": np.ones(K, np.int32)}, TypeError, ["where"]),
        ({"labels": _float(2, K), "pos_weight": np.ones(K + 1)}, ValueError, ["pos_weight"]),
        ({"labels": _float(2, K), "label_smoothing": -0.1}, ValueError, ["label_smoothing"]),
    ]:
        for fn in (
            xent_jax.sigmoid_binary_cross_entropy,
            xent_jax.analytic.sigmoid_binary_cross_entropy_grad,
        ):
            with raises(exception, *patterns):
                fn(logits, **kwargs)


@pytest.mark.parametrize("name", registry.select(analytic=True))
def test_analytic_gradients_take_a_traced_label_smoothing(name):
    logits, labels = valid_inputs(name, batch=3)
    loss_fn, grad_fn = registry.REGISTRY[name].fn, registry.REGISTRY[name].grad_fn
    got = jax.jit(lambda eps: grad_fn(logits, labels, label_smoothing=eps))(jnp.float32(0.2))
    expected = jax.grad(lambda z: jnp.sum(loss_fn(z, labels, label_smoothing=0.2)))(logits)
    assert_close(got, expected)


@pytest.mark.parametrize("value", [0.0, -1.0])
def test_logit_softcap_must_be_positive(value):
    # A cap of 0 divides by zero: log K for finite logits, NaN for a logit of exactly 0.
    logits, labels = valid_inputs("softmax_cross_entropy_with_integer_labels")
    for fn in (
        xent_jax.softmax_cross_entropy_with_integer_labels,
        xent_jax.analytic.softmax_cross_entropy_with_integer_labels_grad,
    ):
        with raises(ValueError, "logit_softcap", "> 0"):
            fn(logits, labels, logit_softcap=value)
    with raises(ValueError, "logit_softcap", "> 0"):
        xent_jax.linear_softmax_cross_entropy_with_integer_labels(
            _float(2, 3), _float(3, K), labels, logit_softcap=value
        )
