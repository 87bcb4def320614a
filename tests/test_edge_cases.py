"""Edge cases of xent_jax: huge and -inf logits, fully masked rows and all-ignored batches,
empty batches, NaN confined to its own example, and half-precision inputs computed in float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import xent_jax
from tests import reference, registry
from tests.tolerances import assert_close, enable_x64_for

B, K = 4, 5
IGNORE = -100
INF = np.inf
REDUCTIONS = ("none", "sum", "mean")


def losses_and_grads(fn, first, *rest, reductions, **kwargs):
    """{reduction: (fn(first, *rest, reduction=..., **kwargs), gradient of its sum)}.

    One compiled program for all (cheaper than eager evaluations of the softmax core).
    """

    @jax.jit
    def compute(x):
        results = {}
        for reduction in reductions:
            kw = {**kwargs, "reduction": reduction}
            results[reduction] = (
                fn(x, *rest, **kw),
                jax.grad(lambda x, kw=kw: jnp.sum(fn(x, *rest, **kw)))(x),
            )
        return results

    return {r: (np.asarray(v), np.asarray(g)) for r, (v, g) in compute(jnp.asarray(first)).items()}


def loss_and_grad(fn, first, *rest, **kwargs):
    """fn(first, *rest, **kwargs) and the gradient of its sum with respect to ``first``."""

    @jax.jit
    def both(x):
        return fn(x, *rest, **kwargs), jax.grad(lambda x: jnp.sum(fn(x, *rest, **kwargs)))(x)

    value, grad = both(jnp.asarray(first))
    return np.asarray(value), np.asarray(grad)


def one_hot(labels, num_classes=K):
    return np.eye(num_classes, dtype=np.float32)[labels]


# --------------------------------------------------------------------------------------------
# ±1e4 logits.
# --------------------------------------------------------------------------------------------

HUGE = np.array([[1e4, -1e4, 0.0]] * 3)
HUGE_LABELS = np.array([0, 1, 2])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_huge_logits_softmax_exact(dtype):
    expected = np.array([0.0, 2e4, 1e4])
    # p = (1, 0, 0) exactly: the gradient p - y is exact too.
    expected_grad = np.array([[1.0, 0.0, 0.0]] * 3) - np.eye(3)
    with enable_x64_for(dtype):
        z = HUGE.astype(dtype)
        for fn, labels in [
            (xent_jax.softmax_cross_entropy, one_hot(HUGE_LABELS, 3).astype(dtype)),
            (xent_jax.softmax_cross_entropy_with_integer_labels, HUGE_LABELS),
        ]:
            value, grad = loss_and_grad(fn, z, labels)
            assert value.dtype == dtype
            np.testing.assert_array_equal(value, expected)
            np.testing.assert_array_equal(grad, expected_grad)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_huge_logits_other_softmax_losses_exact(dtype):
    with enable_x64_for(dtype):
        z = HUGE.astype(dtype)
        focal = xent_jax.softmax_focal_loss_with_integer_labels(z, HUGE_LABELS, gamma=2.0)
        focal_dense = xent_jax.softmax_focal_loss(z, one_hot(HUGE_LABELS, 3).astype(dtype))
        poly = xent_jax.poly_loss_cross_entropy(
            z, one_hot(HUGE_LABELS, 3).astype(dtype), epsilon=2.0
        )
    # (1 - p_y)^2 is 0 or 1 exactly; poly adds epsilon * (1 - p_y).
    np.testing.assert_array_equal(np.asarray(focal), [0.0, 2e4, 1e4])
    np.testing.assert_array_equal(np.asarray(focal_dense), [0.0, 2e4, 1e4])
    np.testing.assert_array_equal(np.asarray(poly), [0.0, 2e4 + 2.0, 1e4 + 2.0])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_huge_logits_sigmoid_exact(dtype):
    x = np.array([1e4, -1e4, 1e4, -1e4], dtype)
    y = np.array([1.0, 0.0, 0.0, 1.0], dtype)
    with enable_x64_for(dtype):
        value, grad = loss_and_grad(xent_jax.sigmoid_binary_cross_entropy, x, y)
        focal = xent_jax.sigmoid_focal_loss(jnp.asarray(x), y, gamma=2.0)
    np.testing.assert_array_equal(value, [0.0, 0.0, 1e4, 1e4])
    np.testing.assert_array_equal(grad, [0.0, 0.0, 1.0, -1.0])
    np.testing.assert_array_equal(np.asarray(focal), [0.0, 0.0, 1e4, 1e4])


# --------------------------------------------------------------------------------------------
# -inf logits (a masked vocabulary).
# --------------------------------------------------------------------------------------------

NEG_INF_LOGITS = np.array([[1.0, 2.0, -INF, 0.5], [-INF, 0.3, -1.0, 2.0]], np.float32)
NEG_INF_DENSE = np.array([[0.3, 0.7, 0.0, 0.0], [0.0, 0.5, 0.25, 0.25]], np.float32)
NEG_INF_INT = np.array([1, 3])
DENSE_LOSSES = registry.select(inputs="logits", labels="dense")
INT_LOSSES = registry.select(inputs="logits", labels="integer")
CROSS_ENTROPIES = registry.select(accepts="class_weights")  # dense and integer labels


@pytest.mark.parametrize("name", DENSE_LOSSES + INT_LOSSES)
def test_neg_inf_logit_without_label_mass_is_finite_and_ignored(name):
    fn = getattr(xent_jax, name)
    labels = NEG_INF_INT if name in INT_LOSSES else NEG_INF_DENSE
    value, grad = loss_and_grad(fn, NEG_INF_LOGITS, labels)
    assert np.all(np.isfinite(value))
    assert np.all(np.isfinite(grad))
    finite = np.isfinite(NEG_INF_LOGITS)
    np.testing.assert_array_equal(grad[~finite], 0.0)
    # Same value and gradient as with the -inf class removed from the row.
    for row in range(2):
        keep = finite[row]
        sub_labels = labels[row : row + 1]
        if name in INT_LOSSES:
            sub_labels = sub_labels - np.sum(~keep[: sub_labels[0]])
        else:
            sub_labels = sub_labels[:, keep]
        sub_value, sub_grad = loss_and_grad(fn, NEG_INF_LOGITS[row : row + 1, keep], sub_labels)
        assert_close(value[row], sub_value[0])
        assert_close(grad[row, keep], sub_grad[0])


def test_neg_inf_logit_finite_where_optax_gives_nan():
    ours = xent_jax.softmax_cross_entropy(NEG_INF_LOGITS, NEG_INF_DENSE)
    theirs = optax.softmax_cross_entropy(NEG_INF_LOGITS, NEG_INF_DENSE)
    assert np.all(np.isfinite(np.asarray(ours)))
    assert np.all(np.isnan(np.asarray(theirs)))


@pytest.mark.parametrize("name", CROSS_ENTROPIES)
def test_label_on_neg_inf_logit_costs_inf(name):
    fn = getattr(xent_jax, name)
    if name in INT_LOSSES:
        labels = np.array([2, 1])
    else:
        labels = np.array([[0.5, 0.0, 0.5, 0.0], [0.0, 1.0, 0.0, 0.0]], np.float32)
    value = np.asarray(fn(NEG_INF_LOGITS, labels))
    assert value[0] == INF
    assert np.isfinite(value[1])


# --------------------------------------------------------------------------------------------
# Fully masked rows, all-ignored and all-masked batches.
# --------------------------------------------------------------------------------------------

SOFTMAX_LOSSES = registry.select(softmax=True)


def _softmax_inputs(name, seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=2.0, size=(B, K)).astype(np.float32)
    labels = rng.integers(0, K, B)
    return logits, (labels if name in INT_LOSSES else one_hot(labels))


@pytest.mark.parametrize("how", ["all_neg_inf", "all_classes_masked"])
@pytest.mark.parametrize("name", SOFTMAX_LOSSES)
def test_fully_masked_row_is_zero_with_zero_gradient(name, how):
    fn = getattr(xent_jax, name)
    logits, labels = _softmax_inputs(name)
    kwargs = {}
    if how == "all_neg_inf":
        logits[1] = -INF
    else:
        mask = np.ones((B, K), bool)
        mask[1] = False
        kwargs["where"] = mask
    if name == "softmax_cross_entropy_with_integer_labels":
        kwargs["class_weights"] = np.random.default_rng(1).uniform(0.5, 2, K).astype(np.float32)
    results = losses_and_grads(fn, logits, labels, reductions=("none", "mean"), **kwargs)
    (value, grad), (mean, mean_grad) = results["none"], results["mean"]
    assert value[1] == 0.0
    assert np.all(np.isfinite(grad))
    np.testing.assert_array_equal(grad[1], 0.0)
    # Left out of the mean: same mean as the batch without that row.
    rest = np.arange(B) != 1
    rest_kwargs = {k: (v[rest] if k == "where" else v) for k, v in kwargs.items()}
    rest_mean, rest_grad = loss_and_grad(
        fn, logits[rest], labels[rest], **rest_kwargs, reduction="mean"
    )
    assert_close(mean, rest_mean)
    np.testing.assert_array_equal(mean_grad[1], 0.0)
    assert_close(mean_grad[rest], rest_grad)


ALL_INTEGER = registry.select(labels="integer")


@pytest.mark.parametrize("name", ALL_INTEGER)
def test_all_ignored_batch_is_zero_not_nan(name):
    fn = getattr(xent_jax, name)
    first = np.random.default_rng(2).uniform(0.1, 1, (B, K)).astype(np.float32)
    labels = np.full(B, IGNORE)
    results = losses_and_grads(fn, first, labels, reductions=REDUCTIONS, ignore_index=IGNORE)
    for reduction, (value, grad) in results.items():
        np.testing.assert_array_equal(value, 0.0, err_msg=reduction)
        np.testing.assert_array_equal(grad, 0.0, err_msg=reduction)


ALL_WITH_WHERE = registry.select(accepts=("where", "reduction"))
ELEMENTWISE_LABELS = set(registry.select(labels="binary"))


def _inputs(name, seed=0, batch=B):
    """Valid positional arguments for any loss, with a batch of ``batch`` rows of K."""
    return registry.example_inputs(name, np.random.default_rng(seed), batch, K)


@pytest.mark.parametrize("name", ALL_WITH_WHERE)
def test_all_masked_examples_mean_is_zero_not_nan(name):
    fn = getattr(xent_jax, name)
    first, second = _inputs(name)
    where = np.zeros((B, K) if name in ELEMENTWISE_LABELS else (B,), bool)
    results = losses_and_grads(fn, first, second, reductions=REDUCTIONS, where=where)
    for reduction, (value, grad) in results.items():
        np.testing.assert_array_equal(value, 0.0, err_msg=reduction)
        np.testing.assert_array_equal(grad, 0.0, err_msg=reduction)


# --------------------------------------------------------------------------------------------
# Empty batches.
# --------------------------------------------------------------------------------------------

EVERY_LOSS = registry.select()
ELEMENTWISE = set(registry.select(elementwise=True))
WITHOUT_REDUCTION = set(registry.select(reduces=False))


@pytest.mark.parametrize("name", EVERY_LOSS)
def test_empty_batch(name):
    fn = getattr(xent_jax, name)
    args = _inputs(name, batch=0)
    reductions = [None] if name in WITHOUT_REDUCTION else ["none", "sum", "mean"]
    for reduction in reductions:
        kwargs = {} if reduction is None else {"reduction": reduction}
        value = fn(*args, **kwargs)
        grad = jax.grad(lambda x, kw=kwargs: jnp.sum(fn(x, *args[1:], **kw)))(jnp.asarray(args[0]))
        assert grad.shape == (0, K)
        if reduction in (None, "none"):
            assert value.shape == ((0, K) if name in ELEMENTWISE else (0,))
        else:
            assert value.shape == ()
            assert float(value) == 0.0


# --------------------------------------------------------------------------------------------
# NaN stays in its own example.
# --------------------------------------------------------------------------------------------

NAN_OPTIONS = {
    "softmax_cross_entropy": {"label_smoothing": 0.1, "class_weights": np.linspace(0.5, 2, K)},
    "softmax_cross_entropy_with_integer_labels": {
        "label_smoothing": 0.1,
        "class_weights": np.linspace(0.5, 2, K),
        "z_loss": 1e-2,
    },
}


@pytest.mark.parametrize("name", EVERY_LOSS)
def test_nan_propagates_only_to_its_example(name):
    fn = getattr(xent_jax, name)
    args = _inputs(name, seed=3)
    kwargs = NAN_OPTIONS.get(name, {})
    first = args[0].copy()
    elementwise = name in ELEMENTWISE
    first[1, 2] = np.nan
    poisoned = np.zeros(first.shape if elementwise else (B,), bool)
    poisoned[(1, 2) if elementwise else 1] = True

    value, grad = loss_and_grad(fn, first, *args[1:], **kwargs)
    assert np.all(np.isnan(value[poisoned]))
    assert not np.any(np.isnan(value[~poisoned]))
    # Rows other than the poisoned one: identical to the batch without it.
    rest = np.arange(B) != 1
    clean_value, clean_grad = loss_and_grad(fn, first[rest], *(a[rest] for a in args[1:]), **kwargs)
    assert_close(value[rest], clean_value)
    assert_close(grad[rest], clean_grad)
    if elementwise:
        others = ~poisoned[1]
        assert_close(value[1, others], fn(args[0], *args[1:], **kwargs)[1, others])


@pytest.mark.parametrize("name", SOFTMAX_LOSSES)
def test_nan_in_masked_example_is_zero_with_zero_gradient(name):
    fn = getattr(xent_jax, name)
    logits, labels = _softmax_inputs(name, seed=4)
    logits[2] = np.nan
    where = np.arange(B) != 2
    value, grad = loss_and_grad(fn, logits, labels, where=where)
    assert value[2] == 0.0
    np.testing.assert_array_equal(grad[2], 0.0)
    assert np.all(np.isfinite(value))
    assert np.all(np.isfinite(grad))


# --------------------------------------------------------------------------------------------
# Half precision: computed in float32, returned in float32.
# --------------------------------------------------------------------------------------------

LOGITS_LOSSES = registry.select(inputs="logits")
LOSS_DTYPE = {
    jnp.bfloat16: np.float32,
    jnp.float16: np.float32,
    jnp.float32: np.float32,
    jnp.float64: np.float64,
}


@pytest.mark.parametrize("dtype", list(LOSS_DTYPE), ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("name", LOGITS_LOSSES)
def test_loss_dtype(name, dtype):
    fn = getattr(xent_jax, name)
    logits, labels = _inputs(name, seed=5)
    with enable_x64_for(dtype):
        logits = jnp.asarray(logits, dtype)
        if labels.dtype.kind == "f":
            labels = jnp.asarray(labels, dtype)
        for reduction in ["none", "mean"]:
            assert fn(logits, labels, reduction=reduction).dtype == LOSS_DTYPE[dtype]


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("name", LOGITS_LOSSES)
def test_half_inputs_match_float32_of_same_values(name, dtype):
    fn = getattr(xent_jax, name)
    logits, labels = _inputs(name, seed=6)
    half_logits = jnp.asarray(logits, dtype)
    half_labels = jnp.asarray(labels, dtype) if labels.dtype.kind == "f" else labels
    up_labels = half_labels.astype(jnp.float32) if labels.dtype.kind == "f" else labels
    got = fn(half_logits, half_labels)
    expected = fn(half_logits.astype(jnp.float32), up_labels)
    assert got.dtype == jnp.float32
    assert_close(got, expected)


def _lse64(z):
    z = np.asarray(z, np.float64)
    m = z.max(-1, keepdims=True)
    return (m + np.log(np.exp(z - m).sum(-1, keepdims=True)))[..., 0]


def test_bfloat16_large_vocabulary_accurate_where_optax_is_not():
    rng = np.random.default_rng(0)
    vocab, batch = 50_000, 8
    logits = jnp.asarray(rng.normal(size=(batch, vocab)), jnp.bfloat16)
    labels = rng.integers(0, vocab, batch)
    up = np.asarray(logits.astype(jnp.float32), np.float64)
    expected_loss = _lse64(up) - up[np.arange(batch), labels]
    assert 10.0 < expected_loss.mean() < 13.0  # loss ~ 11, as in the issue

    ours = xent_jax.softmax_cross_entropy_with_integer_labels(logits, labels)
    ours_dense = xent_jax.softmax_cross_entropy(
        logits, jax.nn.one_hot(labels, vocab, dtype=jnp.bfloat16)
    )
    for got in (ours, ours_dense):
        assert got.dtype == jnp.float32
        assert np.max(np.abs(np.asarray(got, np.float64) - expected_loss) / expected_loss) < 1e-3
        assert_close(got, expected_loss)

    theirs = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    assert theirs.dtype == jnp.bfloat16
    theirs_error = np.abs(np.asarray(theirs, np.float64) - expected_loss)
    assert np.max(theirs_error) > 0.02
    assert np.max(theirs_error / expected_loss) > 1e-3


# --------------------------------------------------------------------------------------------
# Edges of the unshifted fast path (sum of exp(z) scaled by exp(-hint), see _softmax.py).
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "offset",
    [0.0, 70.0, 87.0, 89.0, 100.0, -87.0, -89.0, -100.0],
    ids=lambda o: f"logits{o:+g}",
)
def test_float32_logits_near_the_exp_range_match_float64(offset):
    # Around +-88 the raw sum of exp(z) overflows or turns subnormal in float32: those batches
    # must take the careful path and still agree with float64, values and gradients.
    rng = np.random.default_rng(11)
    z = (offset + 3.0 * rng.normal(size=(6, 40))).astype(np.float32)
    labels = rng.integers(0, 40, 6)
    soft = rng.dirichlet(np.ones(40), 6).astype(np.float32)
    z64 = z.astype(np.float64)
    for fn, target, expected in [
        (
            xent_jax.softmax_cross_entropy_with_integer_labels,
            labels,
            reference.softmax_cross_entropy_with_integer_labels(z64, labels),
        ),
        (xent_jax.softmax_cross_entropy, soft, reference.softmax_cross_entropy(z64, soft)),
    ]:
        value, grad = jax.value_and_grad(lambda x, fn=fn, t=target: fn(x, t).sum())(z)
        assert np.isfinite(value)
        assert_close(value, expected.sum())
        p = np.exp(z64 - _lse64(z64)[:, None])
        t = np.eye(40)[labels] if target is labels else soft.astype(np.float64)
        expected_grad = p * t.sum(-1, keepdims=True) - t
        # float32 cannot hold z - lse better than the spacing of numbers of the logits' size,
        # so p carries that absolute error on top of the table's (any float32 implementation).
        spacing = float(np.spacing(np.float32(np.abs(z).max())))
        assert_close(grad, expected_grad, extra_atol=8 * spacing)


@pytest.mark.parametrize("weights", [None, "class"], ids=["unweighted", "class_weights"])
def test_bfloat16_label_smoothing_matches_float64_of_same_values(weights):
    # bfloat16 + label smoothing reads the class sum through a bf16 dot (no float32 copy).
    rng = np.random.default_rng(12)
    logits = jnp.asarray(20.0 + 4.0 * rng.normal(size=(16, 300)), jnp.bfloat16)
    labels = rng.integers(0, 300, 16)
    class_weights = None if weights is None else rng.uniform(0.5, 2.0, 300).astype(np.float32)
    up = np.asarray(logits.astype(jnp.float32), np.float64)
    expected = reference.softmax_cross_entropy_with_integer_labels(
        up, labels, label_smoothing=0.1, class_weights=class_weights
    )
    got = xent_jax.softmax_cross_entropy_with_integer_labels(
        logits, labels, label_smoothing=0.1, class_weights=class_weights
    )
    assert got.dtype == jnp.float32
    assert_close(got, expected)


@pytest.mark.parametrize("offset", [0.0, 1e3, 1e4])
def test_label_smoothing_on_logits_far_from_zero_matches_float64(offset):
    # Logits sharing a large offset: the smoothing term sum_c w_c (lse - z_c) must not be formed
    # as a difference of two large sums. float32 logits of that size carry an absolute spacing
    # that no float32 implementation can beat (lse is rounded at that size): added to atol.
    rng = np.random.default_rng(13)
    num_classes = 4096
    z = (offset + 3.0 * rng.normal(size=(6, num_classes))).astype(np.float32)
    labels = rng.integers(0, num_classes, 6)
    soft = rng.dirichlet(np.ones(num_classes), 6).astype(np.float32)
    weights = rng.uniform(0.5, 2.0, num_classes).astype(np.float32)
    z64 = z.astype(np.float64)
    spacing = 2 * float(np.spacing(np.float32(np.abs(z).max())))
    for class_weights in (None, weights):
        opts = {"label_smoothing": 0.1, "class_weights": class_weights}
        got = xent_jax.softmax_cross_entropy_with_integer_labels(z, labels, **opts)
        want = reference.softmax_cross_entropy_with_integer_labels(z64, labels, **opts)
        assert_close(got, want, extra_atol=spacing)
    got = xent_jax.softmax_cross_entropy(z, soft, label_smoothing=0.1)
    want = reference.softmax_cross_entropy(z64, soft, label_smoothing=0.1)
    assert_close(got, want, extra_atol=spacing)


def test_label_smoothing_with_class_weights_summing_to_zero():
    # Negative weights whose sum is 0: the smoothing term is -sum_c w_c z_c, not 0.
    z = np.array([[1.0, 2.0, 0.5, -1.0, 3.0], [0.2, -0.4, 1.5, 2.5, -3.0]], np.float32)
    labels = np.array([0, 3])
    weights = np.array([1.0, -1.0, 0.0, 0.5, -0.5], np.float32)
    opts = {"label_smoothing": 0.2, "class_weights": weights}
    got = xent_jax.softmax_cross_entropy_with_integer_labels(z, labels, **opts)
    want = reference.softmax_cross_entropy_with_integer_labels(z.astype(np.float64), labels, **opts)
    assert_close(got, want)


def test_dense_row_without_target_mass_is_zero_even_with_nan_or_inf_logits():
    # 0 * log 0 = 0 for every class: a row whose targets are all 0 costs exactly 0.
    z = np.array([[1.0, np.nan, 0.5], [1.0, np.inf, 0.5], [-INF, -INF, -INF], [1.0, 2.0, 3.0]])
    t = np.array([[0.0, 0.0, 0.0]] * 3 + [[0.2, 0.3, 0.5]])
    got = np.asarray(xent_jax.softmax_cross_entropy(z.astype(np.float32), t.astype(np.float32)))
    np.testing.assert_array_equal(got[:3], 0.0)
    assert_close(got[3], reference.softmax_cross_entropy(z[3:], t[3:])[0])


@pytest.mark.parametrize("order", [[0, 1, 2], [2, 0, 1], [1, 2, 0]])
def test_target_mass_of_both_signs_on_neg_inf_logits_is_nan_in_any_class_order(order):
    # sum_c t_c (lse - z_c) holds +inf and -inf terms: NaN (loud), whatever the class order.
    z = np.array([[-INF, -INF, 0.0]], np.float32)[:, order]
    for targets, weights in [
        (np.array([[0.5, 0.5, 1.0]], np.float32), np.array([1.0, -1.0, 1.0], np.float32)),
        (np.array([[1.0, -1.0, 1.0]], np.float32), None),
    ]:
        got = xent_jax.softmax_cross_entropy(
            z, targets[:, order], class_weights=None if weights is None else weights[order]
        )
        assert np.isnan(np.asarray(got)).all()


@pytest.mark.parametrize("mask", ["example", "class"])
@pytest.mark.parametrize("name", registry.select(accepts="logit_softcap"))
def test_nan_hidden_by_where_has_zero_gradient_with_logit_softcap(name, mask):
    fn = getattr(xent_jax, name)
    logits, labels = _softmax_inputs(name, seed=4)
    label = int(np.argmax(labels[2])) if labels.ndim == 2 else int(labels[2])
    hidden = (2, (label + 1) % K)  # not the label's class: its loss stays finite
    logits[hidden] = np.nan
    if mask == "example":
        where = np.arange(B) != 2
    else:
        where = np.ones((B, K), bool)
        where[hidden] = False
    clean = logits.copy()
    clean[hidden] = 0.0  # hidden either way: the same loss and gradient
    value, grad = loss_and_grad(fn, logits, labels, where=where, logit_softcap=5.0)
    clean_value, clean_grad = loss_and_grad(fn, clean, labels, where=where, logit_softcap=5.0)
    assert_close(value, clean_value)
    assert_close(grad, clean_grad)
    assert grad[hidden] == 0.0 and np.all(np.isfinite(grad))
    # The closed form agrees.
    closed_form = getattr(xent_jax.analytic, f"{name}_grad")(
        logits, labels, where=where, logit_softcap=5.0
    )
    assert_close(closed_form, clean_grad)


def test_fused_nan_bias_on_a_masked_class_keeps_gradients_finite_with_logit_softcap():
    # The class is masked by `where` in every row, so its NaN bias never enters the loss.
    fused = xent_jax.linear_softmax_cross_entropy_with_integer_labels
    rng = np.random.default_rng(11)
    x, w = rng.normal(size=(6, 3)).astype(np.float32), rng.normal(size=(3, K)).astype(np.float32)
    labels = np.array([0, 1, 3, 4, 0, 1])
    where = (np.arange(K) != 2)[None, :]
    bias = np.zeros(K, np.float32)
    opts = {"where": where, "logit_softcap": 5.0, "reduction": "sum"}

    def grads(bias):
        loss = lambda x, w, b: fused(x, w, labels, bias=b, **opts)
        return jax.value_and_grad(loss, argnums=(0, 1, 2))(x, w, jnp.asarray(bias))

    value, got = grads(np.where(np.arange(K) == 2, np.nan, bias).astype(np.float32))
    clean_value, expected = grads(bias)
    assert_close(value, clean_value)
    for a, b in zip(got, expected, strict=True):
        assert np.all(np.isfinite(np.asarray(a)))
        assert_close(a, b)


# --------------------------------------------------------------------------------------------
# Integer labels of any integer dtype; confident predictions.
# --------------------------------------------------------------------------------------------

NARROW_LABEL_CASES = {
    # (dtype, num_classes, labels, ignore_index): 256 wraps to 0 in uint8, -100 to 156.
    "uint8_256_classes": (np.uint8, 256, [0, 65, 200, 255], None),
    "int8_200_classes": (np.int8, 200, [3, 100, 127, 0], None),
    "uint8_ignore_index": (np.uint8, 200, [156, 10, 20, 199], -100),
    "uint16": (np.uint16, 300, [299, 0, 256, 7], -100),
    # Wider: a plain int32 cast would wrap 2**32 - 1 to -1 (= ignore_index) instead of NaN.
    "uint32_out_of_range": (np.uint32, 5, [0, 2**32 - 1, 4, 2**31 + 1], -1),
}


@pytest.mark.parametrize("case", list(NARROW_LABEL_CASES))
@pytest.mark.parametrize("name", ALL_INTEGER)
def test_narrow_and_unsigned_integer_labels_score_as_int32(name, case):
    dtype, num_classes, labels, ignore_index = NARROW_LABEL_CASES[case]
    logits = np.random.default_rng(5).normal(size=(4, num_classes)).astype(np.float32)
    first = jax.nn.softmax(logits) if name == "sparse_categorical_cross_entropy" else logits
    fn = getattr(xent_jax, name)
    kwargs = {} if ignore_index is None else {"ignore_index": ignore_index}
    given = np.asarray(labels, dtype)
    narrow = np.asarray(fn(first, given, **kwargs))
    in_range = np.asarray(labels) < num_classes
    wide = fn(first, np.where(in_range, labels, num_classes).astype(np.int32), **kwargs)
    assert_close(narrow, wide)  # out of range: NaN in both
    assert np.all(np.isfinite(narrow[in_range])) and np.all(narrow[in_range] > 0)
    checked = xent_jax.checked(
        lambda y: xent_jax.validate_integer_labels(y, num_classes, ignore_index=ignore_index)
    )
    if in_range.all():
        np.testing.assert_array_equal(checked(given), labels)
    else:
        with pytest.raises(ValueError, match=f"label {labels[np.argmin(in_range)]} at"):
            checked(given)


def test_integer_labels_beyond_int32_under_x64_stay_out_of_range():
    # int64 / uint64 labels: 2**32 + 3 is not class 3, and 2**40 can be an ignore_index.
    with jax.enable_x64(True):
        logits = jnp.asarray(np.random.default_rng(6).normal(size=(4, 5)))
        x, w = jnp.eye(4, 3, dtype=jnp.float64), logits[:3]
        for dtype in (np.int64, np.uint64):
            labels = np.array([0, 1, 2**32 + 3, 4], dtype)
            for loss in (
                xent_jax.softmax_cross_entropy_with_integer_labels(logits, labels),
                xent_jax.linear_softmax_cross_entropy_with_integer_labels(x, w, labels),
            ):
                assert np.isnan(loss[2]) and np.all(np.isfinite(np.asarray(loss)[[0, 1, 3]]))
        ignored = np.array([0, 1, 2**40, 4], np.int64)
        loss = xent_jax.softmax_cross_entropy_with_integer_labels(
            logits, ignored, ignore_index=2**40
        )
        np.testing.assert_array_equal(np.asarray(loss)[2], 0.0)
        assert np.all(np.asarray(loss)[[0, 1, 3]] > 0)


@pytest.mark.parametrize("ignore_index", [None, -100])
def test_analytic_gradient_with_uint8_labels_matches_autodiff(ignore_index):
    logits = jnp.asarray(np.random.default_rng(8).normal(size=(4, 256)), jnp.float32)
    labels = np.array([0, 156, 255, 7], np.uint8)
    kwargs = {} if ignore_index is None else {"ignore_index": ignore_index}
    got = xent_jax.analytic.softmax_cross_entropy_with_integer_labels_grad(logits, labels, **kwargs)
    loss = xent_jax.softmax_cross_entropy_with_integer_labels
    expected = jax.grad(lambda z: jnp.sum(loss(z, labels.astype(np.int32), **kwargs)))(logits)
    assert np.all(np.isfinite(np.asarray(got)))
    assert_close(got, expected)


def test_checked_message_shows_the_class_count_as_a_number_without_jit():
    checked = xent_jax.checked(lambda y: xent_jax.validate_integer_labels(y, 4))
    with pytest.raises(ValueError) as error:
        checked(jnp.array([0, 7]))
    assert str(error.value) == "invalid integer label 7 at position [1] of labels: outside [0, 4)"


@pytest.mark.parametrize("num_classes", [2, 50])
def test_confident_prediction_loss_is_never_negative(num_classes):
    # lse >= z_y: a loss below 0 is a rounding artefact (it was -1.2e-7 at margins 15-30, for
    # integer and one-hot dense labels alike).
    rng = np.random.default_rng(9)
    logits = rng.normal(size=(4000, num_classes)).astype(np.float32)
    labels = rng.integers(0, num_classes, 4000)
    margin = rng.uniform(10.0, 35.0, 4000).astype(np.float32)
    logits[np.arange(4000), labels] += margin
    z = logits.astype(np.float64)
    exact = np.log(np.exp(z - z[np.arange(4000), labels][:, None]).sum(-1))
    for loss in (
        xent_jax.softmax_cross_entropy_with_integer_labels(logits, labels),
        xent_jax.softmax_cross_entropy(logits, one_hot(labels, num_classes)),
    ):
        loss = np.asarray(loss)
        assert np.all(loss >= 0), loss.min()
        assert_close(loss, exact)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_gradient_with_respect_to_half_precision_targets_has_their_dtype(dtype):
    logits = jnp.asarray(np.random.default_rng(10).normal(size=(3, 4)), dtype)
    targets = jnp.asarray([[1.0, 0, 0, 0], [0, 0.5, 0.5, 0], [0, 0, 0, 1]], dtype)
    grad = jax.grad(lambda t: jnp.sum(xent_jax.softmax_cross_entropy(logits, t)))(targets)
    assert grad.dtype == dtype
    expected = -jax.nn.log_softmax(logits.astype(jnp.float32))
    assert_close(grad, expected, dtype)


def test_careful_path_keeps_the_digits_of_a_confident_loss_at_large_logits():
    # 90 is beyond the float32 exp range: the careful (max-shifted) path. lse - z_y would keep
    # only lse's ulp (7.6e-6 for a true 8.4e-6); (max - z_y) + log(sum) keeps the digits.
    logits = np.array([[90.0, 78.0, 77.0], [1.0, 2.0, 3.0]], np.float32)
    labels = np.array([0, 2])
    loss = xent_jax.softmax_cross_entropy_with_integer_labels(logits, labels)
    z = logits.astype(np.float64)
    exact = np.log1p(np.exp(z - z.max(-1, keepdims=True)).sum(-1) - 1)
    np.testing.assert_allclose(loss, exact, rtol=2e-6, atol=1.2e-7)


@pytest.mark.parametrize(
    "name", registry.select(inputs="probabilities", labels=("binary", "dense"))
)
def test_probability_losses_with_eps_zero_keep_zero_log_zero_and_whole_gradients(name):
    fn = getattr(xent_jax, name)
    probs = jnp.array([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5]])
    labels = jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    loss = fn(probs, labels, eps=0.0)
    if name == "binary_cross_entropy":
        np.testing.assert_array_equal(loss[0], 0.0)  # certain and right: 0, not NaN or -0
        assert not np.any(np.signbit(np.asarray(loss[0])))
        # At the bounds the derivative is the one-sided one from inside [0, 1], not half of it.
        grad = jax.grad(lambda p: jnp.sum(fn(p, labels, eps=0.0)))(
            jnp.array([[0.999, 0.0, 0.0], [0.0, 0.5, 0.5]])
        )
        np.testing.assert_allclose(grad[0, 1:], [1.0, 1.0], rtol=1e-6)
    else:
        np.testing.assert_array_equal(loss[0], 0.0)
        assert not np.any(np.signbit(np.asarray(loss[0])))
        np.testing.assert_allclose(loss[1], np.log(2), rtol=1e-6)
