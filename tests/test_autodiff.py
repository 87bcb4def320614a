"""Autodiff of xent_jax: gradients equal the closed forms of ``xent_jax.analytic``, the Hessian of
softmax cross-entropy is diag(p) - p p^T, ``check_grads`` passes to order 2 in float64, gradients
stay finite at p = 0 and come back in the input dtype."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.special import entr
from jax.test_util import check_grads

import xent_jax
from tests import registry
from tests.tolerances import assert_close, enable_x64_for
from xent_jax import analytic

B, K, T = 4, 5, 3
FLOATS = [np.float32, np.float64]
REDUCTIONS = ["none", "sum", "mean"]
IGNORE = -100


def objective(loss_fn, labels, kwargs):
    """The scalar whose gradient the analytic forms describe: sum for "none"/"sum", else mean."""

    def f(z):
        return jnp.sum(loss_fn(z, labels, **kwargs))

    return f


def check_every_reduction(loss_fn, grad_fn, logits, labels, kwargs, dtype, reductions=REDUCTIONS):
    """jax.grad of the loss equals ``grad_fn`` for each of ``reductions``.

    All reductions are computed in one compiled program: compiling once per option set instead
    of once per (option set, reduction) keeps the suite fast.
    """

    @jax.jit
    def compute(z):
        results = {}
        for reduction in reductions:
            kw = {**kwargs, "reduction": reduction}
            results[reduction] = (
                *jax.value_and_grad(objective(loss_fn, labels, kw))(z),
                grad_fn(z, labels, **kw),
            )
        return results

    for reduction, (value, grad, expected) in compute(logits).items():
        assert value.dtype == dtype, reduction
        assert grad.dtype == dtype, reduction
        assert expected.dtype == dtype, reduction
        assert grad.shape == logits.shape, reduction
        assert np.all(np.isfinite(np.asarray(grad))), reduction
        assert_close(grad, expected, dtype, err_msg=f"reduction={reduction!r}")


# --------------------------------------------------------------------------------------------
# Softmax losses: option sets, composable by name.
# --------------------------------------------------------------------------------------------

SOFTMAX_OPTIONS = {
    "plain": (),
    "example_mask": ("example_mask",),
    "class_mask": ("class_mask",),
    "label_smoothing": ("label_smoothing",),
    "class_weights": ("class_weights",),
    "z_loss": ("z_loss",),
    "logit_softcap": ("logit_softcap",),
    "axis1_mask_smooth_weights": ("axis1", "example_mask", "label_smoothing", "class_weights"),
    "all_class_mask": (
        "class_mask",
        "label_smoothing",
        "class_weights",
        "z_loss",
        "logit_softcap",
    ),
    "all_example_mask": (
        "example_mask",
        "label_smoothing",
        "class_weights",
        "z_loss",
        "logit_softcap",
    ),
}
INTEGER_ONLY_OPTIONS = {
    "ignore_index": ("ignore_index",),
    "ignore_index_in_range": ("ignore_index_in_range",),
    "ignore_weights_mean": ("ignore_index", "class_weights"),
    "all_class_mask_ignore": (
        "class_mask",
        "ignore_index",
        "label_smoothing",
        "class_weights",
        "z_loss",
        "logit_softcap",
    ),
    "all_example_mask_ignore": (
        "example_mask",
        "ignore_index",
        "label_smoothing",
        "class_weights",
        "z_loss",
        "logit_softcap",
    ),
}


def softmax_case(options, *, integer, dtype, seed=0):
    """Logits, labels and keyword arguments for one combination of options.

    Labels never fall on a masked class; the class mask keeps at least two classes per row.
    """
    rng = np.random.default_rng(seed)
    axis = 1 if "axis1" in options else -1
    shape = (B, K, T) if axis == 1 else (B, K)
    logits = rng.normal(scale=2.0, size=shape)
    # Class availability in the classes-last layout.
    last = np.moveaxis(np.zeros(shape), axis, -1)
    allowed = np.ones(last.shape, bool)
    kwargs = {"axis": axis} if axis != -1 else {}
    if "class_mask" in options:
        allowed[..., 3] = False
        allowed[1, 1] = False
        allowed[2, 4] = False
        kwargs["where"] = np.moveaxis(allowed, -1, axis)
    batch_shape = last.shape[:-1]
    if "example_mask" in options:
        example = np.ones(batch_shape, bool)
        example.flat[1] = False
        kwargs["where"] = example
    if "label_smoothing" in options:
        kwargs["label_smoothing"] = 0.2
    if "class_weights" in options:
        kwargs["class_weights"] = rng.uniform(0.5, 2.0, K).astype(dtype)
    if "z_loss" in options:
        kwargs["z_loss"] = 0.05
    if "logit_softcap" in options:
        kwargs["logit_softcap"] = 3.0
    # Each row draws its label (or its label distribution) among the allowed classes.
    scores = rng.random(last.shape) * allowed
    if integer:
        labels = np.argmax(scores, axis=-1).astype(np.int32)
        if "ignore_index" in options:
            labels.flat[2] = IGNORE
            kwargs["ignore_index"] = IGNORE
        if "ignore_index_in_range" in options:
            # A real class id used as padding: every example labelled 0 is ignored.
            labels.flat[0] = 0
            kwargs["ignore_index"] = 0
    else:
        dense = scores**2
        dense /= dense.sum(-1, keepdims=True)
        labels = np.moveaxis(dense, -1, axis).astype(dtype)
    return logits.astype(dtype), labels, kwargs


ALL_SOFTMAX_OPTIONS = {**SOFTMAX_OPTIONS, **INTEGER_ONLY_OPTIONS}
# float32 runs every option set; float64 the combinations (each option is on in one of them).
FLOAT64_OPTIONS = {
    False: {"plain", "all_class_mask", "axis1_mask_smooth_weights"},
    True: {"plain", "all_example_mask_ignore", "ignore_weights_mean"},
}
SOFTMAX_PARAMS = [
    (integer, name, dtype)
    for integer, names in [(False, SOFTMAX_OPTIONS), (True, ALL_SOFTMAX_OPTIONS)]
    for name in names
    for dtype in FLOATS
    if dtype == np.float32 or name in FLOAT64_OPTIONS[integer]
]


@pytest.mark.parametrize(("integer", "option", "dtype"), SOFTMAX_PARAMS)
def test_softmax_grad_matches_analytic(integer, option, dtype):
    (loss,) = registry.select(
        accepts="class_weights", labels="integer" if integer else "dense", analytic=True
    )
    loss_fn, grad_fn = registry.REGISTRY[loss].fn, registry.REGISTRY[loss].grad_fn
    with enable_x64_for(dtype):
        options = ALL_SOFTMAX_OPTIONS[option]
        logits, labels, kwargs = softmax_case(options, integer=integer, dtype=dtype)
        # "sum" differentiates the same objective as "none"; single options skip it.
        reductions = REDUCTIONS if len(options) != 1 else ("none", "mean")
        check_every_reduction(
            loss_fn, grad_fn, jnp.asarray(logits), labels, kwargs, dtype, reductions
        )


def test_softmax_grad_is_softmax_minus_target_without_options():
    """The closed form itself, checked against p - y written out here in float64."""
    logits, labels, _ = softmax_case((), integer=False, dtype=np.float64, seed=3)
    with jax.enable_x64(True):
        got = analytic.softmax_cross_entropy_grad(jnp.asarray(logits), jnp.asarray(labels))
        got_int = analytic.softmax_cross_entropy_with_integer_labels_grad(
            jnp.asarray(logits), jnp.asarray(labels.argmax(-1))
        )
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    assert_close(got, p - labels, np.float64)
    assert_close(got_int, p - np.eye(K)[labels.argmax(-1)], np.float64)


def test_masked_example_and_ignored_label_have_zero_gradient_rows():
    logits, labels, kwargs = softmax_case(
        ("example_mask", "label_smoothing", "z_loss"), integer=True, dtype=np.float32
    )
    labels[0] = IGNORE
    grad = jax.jit(
        jax.grad(
            objective(
                xent_jax.softmax_cross_entropy_with_integer_labels,
                labels,
                {**kwargs, "ignore_index": IGNORE, "reduction": "mean"},
            )
        )
    )(jnp.asarray(logits))
    np.testing.assert_array_equal(np.asarray(grad[:2]), 0.0)
    assert np.all(np.asarray(grad[2:]) != 0.0)


# --------------------------------------------------------------------------------------------
# Sigmoid binary cross-entropy.
# --------------------------------------------------------------------------------------------

SIGMOID_OPTIONS = {
    "plain": (),
    "where_elements": ("where_elements",),
    "where_rows": ("where_rows",),
    "label_smoothing": ("label_smoothing",),
    "pos_weight_scalar": ("pos_weight_scalar",),
    "pos_weight_per_class": ("pos_weight_per_class",),
    "all": ("where_elements", "label_smoothing", "pos_weight_per_class"),
}


def sigmoid_case(options, *, dtype, seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=2.0, size=(B, K))
    labels = rng.random((B, K))
    labels[0] = np.round(labels[0])  # hard labels in one row, soft in the others
    kwargs = {}
    if "where_elements" in options:
        kwargs["where"] = rng.random((B, K)) < 0.7
    if "where_rows" in options:
        kwargs["where"] = np.array([[True], [False], [True], [True]])
    if "label_smoothing" in options:
        kwargs["label_smoothing"] = 0.1
    if "pos_weight_scalar" in options:
        kwargs["pos_weight"] = 3.0
    if "pos_weight_per_class" in options:
        kwargs["pos_weight"] = rng.uniform(0.5, 4.0, K).astype(dtype)
    return logits.astype(dtype), labels.astype(dtype), kwargs


@pytest.mark.parametrize(
    ("option", "dtype"),
    [(name, np.float32) for name in SIGMOID_OPTIONS]
    + [(name, np.float64) for name in ("plain", "all", "pos_weight_scalar")],
)
def test_sigmoid_grad_matches_analytic(option, dtype):
    with enable_x64_for(dtype):
        logits, labels, kwargs = sigmoid_case(SIGMOID_OPTIONS[option], dtype=dtype)
        check_every_reduction(
            xent_jax.sigmoid_binary_cross_entropy,
            analytic.sigmoid_binary_cross_entropy_grad,
            jnp.asarray(logits),
            labels,
            kwargs,
            dtype,
        )


def test_sigmoid_grad_is_sigmoid_minus_label_without_options():
    logits, labels, _ = sigmoid_case((), dtype=np.float64, seed=4)
    with jax.enable_x64(True):
        got = analytic.sigmoid_binary_cross_entropy_grad(jnp.asarray(logits), jnp.asarray(labels))
    assert_close(got, 1.0 / (1.0 + np.exp(-logits)) - labels, np.float64)


# --------------------------------------------------------------------------------------------
# Hessian of softmax cross-entropy.
# --------------------------------------------------------------------------------------------


def diag_p_minus_ppt(logits):
    z = np.asarray(logits, np.float64)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("...i,ij->...ij", p, np.eye(p.shape[-1])) - p[..., :, None] * p[..., None, :]


@pytest.mark.parametrize(
    ("label_smoothing", "dtype"), [(0.0, np.float32), (0.3, np.float32), (0.0, np.float64)]
)
@pytest.mark.parametrize("integer", [False, True], ids=["dense", "integer"])
def test_hessian_is_diag_p_minus_ppt(integer, label_smoothing, dtype):
    loss_fn = (
        xent_jax.softmax_cross_entropy_with_integer_labels
        if integer
        else xent_jax.softmax_cross_entropy
    )
    with enable_x64_for(dtype):
        logits, labels, _ = softmax_case((), integer=integer, dtype=dtype, seed=1)
        logits = jnp.asarray(logits)
        f = objective(loss_fn, labels, {"label_smoothing": label_smoothing})
        full = np.asarray(jax.jit(jax.hessian(f))(logits), np.float64)  # [B, K, B, K]
        closed = analytic.softmax_cross_entropy_hessian(logits)
    assert full.shape == (B, K, B, K)
    assert closed.shape == (B, K, K)
    assert closed.dtype == dtype
    rows = np.arange(B)
    blocks = full[rows, :, rows, :]  # [B, K, K]: the per-example diagonal blocks
    off_diagonal = full.copy()
    off_diagonal[rows, :, rows, :] = 0.0
    np.testing.assert_array_equal(off_diagonal, 0.0)
    expected = diag_p_minus_ppt(logits)
    assert_close(blocks, expected, dtype)
    assert_close(closed, expected, dtype)


def test_hessian_closed_form_class_axis_first():
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(K, B)).astype(np.float32)
    closed = analytic.softmax_cross_entropy_hessian(jnp.asarray(logits), axis=0)
    assert closed.shape == (B, K, K)
    assert_close(closed, diag_p_minus_ppt(logits.T), np.float32)


# --------------------------------------------------------------------------------------------
# check_grads to order 2 in float64, every loss.
# --------------------------------------------------------------------------------------------


def _simplex(rng, shape):
    p = rng.uniform(0.1, 1.0, shape)
    return p / p.sum(-1, keepdims=True)


def _logits(rng, shape=(2, 3)):
    return rng.normal(scale=1.5, size=shape)


def _first_arg_only(fn, *fixed, **kwargs):
    """``fn`` as a function of its first argument, the others fixed."""
    return lambda x: fn(x, *fixed, **kwargs)


_OPTIONS = {"label_smoothing": 0.1, "z_loss": 0.1, "logit_softcap": 2.0, "reduction": "mean"}

# Each entry: rng -> (function of the differentiated arguments, those arguments).
CHECK_GRADS_CASES = {
    "entropy": lambda rng: (
        _first_arg_only(xent_jax.entropy, base=2, where=np.array([True, False, True])),
        (_simplex(rng, (2, 3)),),
    ),
    "cross_entropy": lambda rng: (
        xent_jax.cross_entropy,
        (_simplex(rng, (2, 3)), _simplex(rng, (2, 3))),
    ),
    "kl_divergence": lambda rng: (
        xent_jax.kl_divergence,
        (_simplex(rng, (2, 3)), _simplex(rng, (2, 3))),
    ),
    "js_divergence": lambda rng: (
        xent_jax.js_divergence,
        (_simplex(rng, (2, 3)), _simplex(rng, (2, 3))),
    ),
    "binary_entropy": lambda rng: (xent_jax.binary_entropy, (rng.uniform(0.1, 0.9, (2, 3)),)),
    "softmax_cross_entropy": lambda rng: (
        _first_arg_only(
            xent_jax.softmax_cross_entropy,
            _simplex(rng, (2, 3)),
            class_weights=rng.uniform(0.5, 2, 3),
            **_OPTIONS,
        ),
        (_logits(rng),),
    ),
    "softmax_cross_entropy_with_integer_labels": lambda rng: (
        _first_arg_only(
            xent_jax.softmax_cross_entropy_with_integer_labels,
            np.array([2, 0, IGNORE]),
            ignore_index=IGNORE,
            class_weights=rng.uniform(0.5, 2, 3),
            **_OPTIONS,
        ),
        (_logits(rng, (3, 3)),),
    ),
    "sigmoid_binary_cross_entropy": lambda rng: (
        _first_arg_only(
            xent_jax.sigmoid_binary_cross_entropy,
            rng.random((2, 3)),
            pos_weight=2.0,
            label_smoothing=0.1,
        ),
        (_logits(rng),),
    ),
    # The fused sum of the mean: every input differentiated, the smoothing inside its passes.
    "sigmoid_binary_cross_entropy/mean_all_inputs": lambda rng: (
        lambda x, y, pos_weight, eps: xent_jax.sigmoid_binary_cross_entropy(
            x, y, pos_weight=pos_weight, label_smoothing=eps, reduction="mean"
        ),
        (_logits(rng), rng.random((2, 3)), rng.uniform(0.5, 2, 3), np.array(0.1)),
    ),
    "sigmoid_binary_cross_entropy/sum_without_pos_weight": lambda rng: (
        lambda x, y, eps: xent_jax.sigmoid_binary_cross_entropy(
            x, y, label_smoothing=eps, reduction="sum"
        ),
        (_logits(rng), rng.random((2, 3)), np.array(0.2)),
    ),
    "sigmoid_focal_loss": lambda rng: (
        _first_arg_only(xent_jax.sigmoid_focal_loss, rng.random((2, 3)), alpha=0.25, gamma=2.0),
        (_logits(rng),),
    ),
    "softmax_focal_loss": lambda rng: (
        _first_arg_only(
            xent_jax.softmax_focal_loss,
            _simplex(rng, (2, 3)),
            alpha=np.array([0.2, 0.5, 0.3]),
            gamma=2.0,
        ),
        (_logits(rng),),
    ),
    "softmax_focal_loss_with_integer_labels": lambda rng: (
        _first_arg_only(
            xent_jax.softmax_focal_loss_with_integer_labels,
            np.array([1, 2]),
            alpha=0.25,
            gamma=1.5,
        ),
        (_logits(rng),),
    ),
    "poly_loss_cross_entropy": lambda rng: (
        _first_arg_only(
            xent_jax.poly_loss_cross_entropy,
            _simplex(rng, (2, 3)),
            epsilon=2.0,
            label_smoothing=0.1,
        ),
        (_logits(rng),),
    ),
    "binary_cross_entropy": lambda rng: (
        _first_arg_only(xent_jax.binary_cross_entropy, rng.random((2, 3)), label_smoothing=0.1),
        (rng.uniform(0.1, 0.9, (2, 3)),),
    ),
    "categorical_cross_entropy": lambda rng: (
        _first_arg_only(xent_jax.categorical_cross_entropy, _simplex(rng, (2, 3))),
        (rng.uniform(0.1, 0.9, (2, 3)),),
    ),
    "sparse_categorical_cross_entropy": lambda rng: (
        _first_arg_only(xent_jax.sparse_categorical_cross_entropy, np.array([0, 2])),
        (rng.uniform(0.1, 0.9, (2, 3)),),
    ),
}


# Checked through jax.jit: evaluated eagerly, the softmax losses' lax.cond (fast / careful path)
# compiles anew on every call, which makes check_grads several times slower. The others are
# faster eagerly.
CHECK_GRADS_UNDER_JIT = set(registry.select(softmax=True))


def test_check_grads_covers_every_loss():
    assert {name.split("/")[0] for name in CHECK_GRADS_CASES} == set(registry.select())


@pytest.mark.parametrize("name", list(CHECK_GRADS_CASES))
def test_check_grads_order_2_float64(name):
    with jax.enable_x64(True):
        fn, args = CHECK_GRADS_CASES[name](np.random.default_rng(11))
        args = tuple(jnp.asarray(a, jnp.float64) for a in args)
        value = fn(*args)
        assert value.dtype == jnp.float64
        assert np.all(np.isfinite(np.asarray(value)))
        check_grads(
            jax.jit(fn) if name in CHECK_GRADS_UNDER_JIT else fn,
            args,
            order=2,
            modes=("fwd", "rev"),
        )


# --------------------------------------------------------------------------------------------
# Finite gradients where a probability is exactly 0.
# --------------------------------------------------------------------------------------------

MASKED_LOGITS = np.array([[1.0, 2.0, -np.inf, 0.5], [-np.inf, 0.3, -1.0, -np.inf]], np.float32)


def test_entropy_of_softmax_with_masked_logit_has_finite_gradient():
    z = jnp.asarray(MASKED_LOGITS)
    grad = jax.grad(lambda z: jnp.sum(xent_jax.entropy(jax.nn.softmax(z))))(z)
    assert np.all(np.isfinite(np.asarray(grad)))
    np.testing.assert_array_equal(np.asarray(grad)[~np.isfinite(MASKED_LOGITS)], 0.0)
    # The masked logit changes nothing: same gradient as on the unmasked classes alone.
    for row in range(z.shape[0]):
        kept = np.isfinite(MASKED_LOGITS[row])
        sub = jax.grad(lambda z: xent_jax.entropy(jax.nn.softmax(z)))(z[row][kept])
        assert_close(np.asarray(grad[row])[kept], sub, np.float32)
    # The trap the library avoids: jax.scipy.special.entr poisons the whole gradient.
    poisoned = jax.grad(lambda z: jnp.sum(entr(jax.nn.softmax(z))))(z)
    assert not np.all(np.isfinite(np.asarray(poisoned)))


def test_entropy_gradient_at_zero_probability_is_zero_elsewhere_minus_log_p_minus_one():
    p = jnp.array([0.0, 0.25, 0.75])
    grad = jax.grad(xent_jax.entropy)(p)
    expected = np.array([0.0, -np.log(0.25) - 1.0, -np.log(0.75) - 1.0])
    assert_close(grad, expected, np.float32)


@pytest.mark.parametrize("name", registry.select(labels="distribution"))
def test_divergence_gradients_finite_with_zero_probabilities(name):
    fn = getattr(xent_jax, name)
    p = jnp.array([[0.0, 0.5, 0.5], [0.2, 0.0, 0.8]])
    q = (
        jnp.array([[0.3, 0.3, 0.4], [0.5, 0.5, 0.0]])
        if name == "js_divergence"
        else (jnp.array([[0.3, 0.3, 0.4], [0.5, 0.1, 0.4]]))
    )
    value = fn(p, q)
    assert np.all(np.isfinite(np.asarray(value)))
    gp, gq = jax.grad(lambda p, q: jnp.sum(fn(p, q)), argnums=(0, 1))(p, q)
    assert np.all(np.isfinite(np.asarray(gp)))
    assert np.all(np.isfinite(np.asarray(gq)))


def test_binary_entropy_gradient_finite_at_zero_and_one():
    p = jnp.array([0.0, 0.3, 1.0])
    value = xent_jax.binary_entropy(p)
    np.testing.assert_array_equal(np.asarray(value)[[0, 2]], 0.0)
    grad = jax.grad(lambda p: jnp.sum(xent_jax.binary_entropy(p)))(p)
    assert np.all(np.isfinite(np.asarray(grad)))
    assert_close(grad[1], np.log(0.7 / 0.3), np.float32)


# --------------------------------------------------------------------------------------------
# Half precision: gradients come back in the input dtype.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("name", registry.select(inputs="logits"))
def test_half_precision_gradient_dtype_is_input_dtype(name, dtype):
    rng = np.random.default_rng(2)
    logits = jnp.asarray(_logits(rng, (B, K)), dtype)
    kind = registry.REGISTRY[name].labels
    if kind == "integer":
        labels = rng.integers(0, K, B)
    else:
        labels = rng.random((B, K)) if kind == "binary" else _simplex(rng, (B, K))
    if labels.dtype.kind == "f":
        labels = jnp.asarray(labels, dtype)
    fn = getattr(xent_jax, name)
    labels32 = labels.astype(jnp.float32) if labels.dtype == dtype else labels

    @jax.jit
    def grads(z):
        # The half-precision gradient and, for comparison, the float32 one of the same values.
        return (
            jax.grad(lambda z: jnp.sum(fn(z, labels)))(z),
            jax.grad(lambda z: jnp.sum(fn(z, labels32)))(z.astype(jnp.float32)),
        )

    grad, grad32 = grads(logits)
    assert grad.dtype == dtype
    assert np.all(np.isfinite(np.asarray(grad, np.float32)))
    assert_close(grad, grad32, dtype)


# --------------------------------------------------------------------------------------------
# Gradients with respect to the labels, at labels of exactly 0 and 1.
# --------------------------------------------------------------------------------------------

LABEL_GRAD_LOGITS = np.array([[2.0, -1.0, 0.5, 3.0], [-2.5, 1.5, 0.0, -0.3]])
BINARY_LABELS = np.array([[0.0, 1.0, 0.3, 1.0], [1.0, 0.0, 0.0, 0.7]])
SIMPLEX_LABELS = np.array([[1.0, 0.0, 0.0, 0.0], [0.0, 0.5, 0.5, 0.0]])

LABEL_GRAD_CASES = {
    "sigmoid_bce_none": (xent_jax.sigmoid_binary_cross_entropy, BINARY_LABELS, {}),
    "sigmoid_bce_sum": (
        xent_jax.sigmoid_binary_cross_entropy,
        BINARY_LABELS,
        {"reduction": "sum"},
    ),
    "sigmoid_bce_pos_weight": (
        xent_jax.sigmoid_binary_cross_entropy,
        BINARY_LABELS,
        {"pos_weight": 3.0},
    ),
    "sigmoid_bce_smoothing_sum": (
        xent_jax.sigmoid_binary_cross_entropy,
        BINARY_LABELS,
        {"label_smoothing": 0.1, "reduction": "sum"},
    ),
    "sigmoid_bce_pos_weight_mean": (
        xent_jax.sigmoid_binary_cross_entropy,
        BINARY_LABELS,
        {"pos_weight": 3.0, "reduction": "mean"},
    ),
    "sigmoid_focal": (xent_jax.sigmoid_focal_loss, BINARY_LABELS, {"alpha": 0.25}),
    "softmax_focal": (xent_jax.softmax_focal_loss, SIMPLEX_LABELS, {"gamma": 2.0}),
    "poly": (xent_jax.poly_loss_cross_entropy, SIMPLEX_LABELS, {"epsilon": 2.0}),
    "softmax_dense": (xent_jax.softmax_cross_entropy, SIMPLEX_LABELS, {"label_smoothing": 0.1}),
}


def test_label_gradient_cases_cover_every_logits_loss_with_float_labels():
    covered = {fn.__name__ for fn, _, _ in LABEL_GRAD_CASES.values()}
    assert covered == set(registry.select(inputs="logits", labels=("dense", "binary")))


@pytest.mark.parametrize("name", list(LABEL_GRAD_CASES))
def test_label_gradients_at_labels_of_exactly_zero_and_one(name):
    # Distillation trains the targets too: d loss / d label at a label of exactly 0 or 1 is the
    # derivative of a smooth function there (softplus(-x) - softplus(x) = -x for plain BCE), not
    # 0; so are the mixed second derivatives in logits and labels. Checked against finite
    # differences in float64.
    fn, labels, kwargs = LABEL_GRAD_CASES[name]
    with jax.enable_x64(True):
        logits = jnp.asarray(LABEL_GRAD_LOGITS)
        total = lambda y: jnp.sum(fn(logits, y, **kwargs))
        check_grads(total, (jnp.asarray(labels),), order=2, modes=("fwd", "rev"))
        both = lambda x, y: jnp.sum(fn(x, y, **kwargs))
        check_grads(both, (logits, jnp.asarray(labels)), order=2, modes=("rev",))
        if name == "sigmoid_bce_none":
            np.testing.assert_allclose(jax.grad(total)(jnp.asarray(labels)), -LABEL_GRAD_LOGITS)


def test_cross_entropy_gradient_in_p_is_minus_log_q_at_p_zero():
    # H(p, q) is linear in p: d/dp_i = -log q_i, also where p_i = 0 (and 0, finite, where both
    # p_i and q_i are 0).
    p, q = jnp.array([1.0, 0.0, 0.0, 0.0]), jnp.array([0.5, 0.25, 0.25, 0.0])
    grad = jax.grad(lambda p: xent_jax.cross_entropy(p, q))(p)
    np.testing.assert_allclose(grad, [np.log(2), np.log(4), np.log(4), 0.0], rtol=1e-6)
    grad_kl = jax.grad(lambda p: xent_jax.kl_divergence(p, q))(p)
    np.testing.assert_allclose(grad_kl[1:3], [np.log(4), np.log(4)], rtol=1e-6)


@pytest.mark.parametrize("name", registry.select(inputs="distribution"))
def test_where_keeps_masked_infinities_out_of_gradients(name):
    # The masked entry has p > 0 = q: KL and cross-entropy would be +inf there. Masked, it
    # leaves the sum and the gradients: the same as dropping the entry before the call.
    fn = getattr(xent_jax, name)
    z = jnp.array([0.3, -0.2, 0.5])
    q = jnp.array([0.5, 0.5, 0.0])
    where = jnp.array([True, True, False])

    def masked(z, q):
        p = jax.nn.softmax(z)
        return fn(p, where=where) if name == "entropy" else fn(p, q, where=where)

    def dropped(z, q):
        p = jax.nn.softmax(z)[:2]
        return fn(p) if name == "entropy" else fn(p, q[:2])

    value, (dz, dq) = jax.value_and_grad(masked, argnums=(0, 1))(z, q)
    ref_value, (_, ref_dq) = jax.value_and_grad(dropped, argnums=(0, 1))(z, q)
    assert_close(value, ref_value, np.float32)
    assert np.all(np.isfinite(dz)) and np.all(np.isfinite(dq))
    # Dropping changes the softmax's normaliser only through z[2]: compare the kept entries.
    ref_dz_full = jax.grad(lambda z: dropped(z, q))(z)
    assert_close(dz, ref_dz_full, np.float32)
    assert_close(dq[:2], ref_dq[:2], np.float32)
    assert dq[2] == 0.0
