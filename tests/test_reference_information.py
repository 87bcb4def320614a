"""Information-theory functions against SciPy and the float64 NumPy references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.spatial.distance
import scipy.special
import scipy.stats

import xent_jax
from tests import reference, registry
from tests.tolerances import assert_close

DTYPES = [np.float32, np.float64]
BASES = [None, 2, 10]


def _distributions(seed, shape, zero_fraction=0.0):
    """Rows of probability vectors along the last axis, with some exact zeros if asked."""
    rng = np.random.default_rng(seed)
    raw = rng.gamma(0.7, size=shape)
    if zero_fraction:
        raw = np.where(rng.uniform(size=shape) < zero_fraction, 0.0, raw)
        raw[..., 0] += 0.1  # keep every row non-empty
    return raw / raw.sum(axis=-1, keepdims=True)


def _call(name, dtype, *arrays, **kwargs):
    """Runs ``xent_jax.<name>`` on ``arrays`` cast to ``dtype``; checks the dtype; float64 out."""
    arrays = [np.asarray(a, dtype) for a in arrays]
    with jax.enable_x64(dtype == np.float64):
        out = getattr(xent_jax, name)(*arrays, **kwargs)
        assert out.dtype == dtype, (name, out.dtype)
        return np.asarray(out, np.float64)


def _cast(x, dtype):
    """The float64 value of ``x`` after rounding it to ``dtype`` (what the library receives)."""
    return np.asarray(np.asarray(x, dtype), np.float64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("base", [None, 2])
@pytest.mark.parametrize("zero_fraction", [0.0, 0.3])
def test_entropy_matches_scipy(zero_fraction, base, dtype):
    p = _cast(_distributions(0, (6, 7), zero_fraction), dtype)
    expected = scipy.stats.entropy(p, base=base, axis=-1)
    assert_close(_call("entropy", dtype, p, base=base), expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("base", [None, 2])
def test_kl_divergence_matches_scipy(base, dtype):
    p = _cast(_distributions(1, (5, 6), 0.3), dtype)
    q = _cast(_distributions(2, (5, 6)), dtype)
    expected = scipy.stats.entropy(p, q, base=base, axis=-1)
    assert_close(_call("kl_divergence", dtype, p, q, base=base), expected, dtype)
    scale = 1.0 if base is None else np.log(base)
    rel_entr = scipy.special.rel_entr(p, q).sum(-1) / scale
    assert_close(_call("kl_divergence", dtype, p, q, base=base), rel_entr, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("base", [None, 2])
def test_cross_entropy_is_entropy_plus_kl(base, dtype):
    p = _cast(_distributions(3, (5, 6), 0.3), dtype)
    q = _cast(_distributions(4, (5, 6)), dtype)
    expected = scipy.stats.entropy(p, base=base, axis=-1) + scipy.stats.entropy(
        p, q, base=base, axis=-1
    )
    out = _call("cross_entropy", dtype, p, q, base=base)
    assert_close(out, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("base", [None, 2])
def test_js_divergence_matches_scipy_jensenshannon(base, dtype):
    p = _cast(_distributions(5, (4, 6), 0.3), dtype)
    q = _cast(_distributions(6, (4, 6), 0.3), dtype)
    # scipy returns the Jensen-Shannon *distance*, the square root of the divergence.
    expected = scipy.spatial.distance.jensenshannon(p, q, base=base, axis=-1) ** 2
    out = _call("js_divergence", dtype, p, q, base=base)
    assert_close(out, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("base", [None, 2])
def test_binary_entropy_matches_scipy(base, dtype):
    p = _cast(np.array([0.0, 1e-6, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0]), dtype)
    expected = scipy.stats.entropy(np.stack([p, 1.0 - p]), base=base, axis=0)
    out = _call("binary_entropy", dtype, p, base=base)
    assert_close(out, expected, dtype)
    assert_close(out, reference.binary_entropy(p, base=base), dtype)


# name -> number of probability arguments.
FUNCTIONS = {
    name: 1 if registry.REGISTRY[name].labels is None else 2
    for name in registry.select(inputs="distribution")
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("axis", [-1, 0, 1])
@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_matches_reference_on_any_axis(name, axis, base, dtype):
    shape = (3, 5, 4)
    args = [
        _cast(np.moveaxis(_distributions(10 + i, shape, 0.25), -1, axis), dtype)
        for i in range(FUNCTIONS[name])
    ]
    expected = getattr(reference, name)(*args, axis=axis, base=base)
    out = _call(name, dtype, *args, axis=axis, base=base)
    assert out.shape == expected.shape
    assert_close(out, expected, dtype)


@pytest.mark.parametrize("base", [2, 10, np.e])
@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_base_divides_nats_by_log_base(name, base):
    args = [_distributions(20 + i, (4, 5), 0.2) for i in range(FUNCTIONS[name])]
    with jax.enable_x64(True):
        nats = np.asarray(getattr(xent_jax, name)(*args))
        in_base = np.asarray(getattr(xent_jax, name)(*args, base=base))
    assert_close(in_base, nats / np.log(base), np.float64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_where_drops_masked_entries_from_the_sum(name, dtype):
    args = [_cast(_distributions(30 + i, (4, 6), 0.2), dtype) for i in range(FUNCTIONS[name])]
    mask = np.random.default_rng(31).uniform(size=(4, 6)) < 0.6
    expected = getattr(reference, name)(*args, where=mask)
    assert_close(_call(name, dtype, *args, where=mask), expected, dtype)
    # A masked entry is the same as an entry that is not there at all.
    row = [a[0] for a in args]
    kept = [a[mask[0]] for a in row]
    assert_close(_call(name, dtype, *row, where=mask[0]), getattr(reference, name)(*kept), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_where_broadcasts_a_per_class_mask(name, dtype):
    args = [_cast(_distributions(40 + i, (3, 5), 0.2), dtype) for i in range(FUNCTIONS[name])]
    mask = np.array([True, False, True, True, False])
    expected = getattr(reference, name)(*args, where=mask)
    assert_close(_call(name, dtype, *args, where=mask), expected, dtype)


def test_inputs_are_not_renormalised():
    p = np.array([0.5, 0.25])  # sums to 0.75
    q = np.array([0.2, 0.2])
    with jax.enable_x64(True):
        np.testing.assert_allclose(
            xent_jax.entropy(p), -(0.5 * np.log(0.5) + 0.25 * np.log(0.25)), rtol=1e-14
        )
        np.testing.assert_allclose(xent_jax.cross_entropy(p, q), -(0.75 * np.log(0.2)), rtol=1e-14)
        np.testing.assert_allclose(
            xent_jax.kl_divergence(p, q), scipy.special.rel_entr(p, q).sum(), rtol=1e-14
        )


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_probabilities_follow_0_log_0_convention(dtype):
    p = np.array([[0.0, 1.0, 0.0], [0.5, 0.5, 0.0]])
    q = np.array([[0.0, 1.0, 0.0], [0.5, 0.0, 0.5]])
    np.testing.assert_array_equal(_call("entropy", dtype, p[:1]), [0.0])
    out = _call("cross_entropy", dtype, p, q)
    assert out[0] == 0.0 and out[1] == np.inf
    out = _call("kl_divergence", dtype, p, q)
    assert out[0] == 0.0 and out[1] == np.inf
    # m = (p + q) / 2 is never zero where p or q is positive: JS stays finite.
    out = _call("js_divergence", dtype, p, q)
    assert_close(out, reference.js_divergence(p, q), dtype)
    np.testing.assert_array_equal(_call("binary_entropy", dtype, np.array([0.0, 1.0])), [0.0, 0.0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_entropy_gradient_is_finite_at_zero(dtype):
    with jax.enable_x64(dtype == np.float64):
        p = jnp.asarray([0.0, 0.3, 0.7], dtype)
        grad = jax.grad(lambda x: xent_jax.entropy(x))(p)
        # d/dp (-p log p) = -log p - 1 away from zero; defined as 0 at p = 0.
        assert_close(
            np.asarray(grad, np.float64), [0.0, -np.log(0.3) - 1.0, -np.log(0.7) - 1.0], dtype
        )
        z = jnp.asarray([1.0, -jnp.inf, 0.5], dtype)
        grad = jax.grad(lambda x: xent_jax.entropy(jax.nn.softmax(x)))(z)
        assert np.all(np.isfinite(np.asarray(grad)))
