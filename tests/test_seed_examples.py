"""The worked examples of the three seed articles, numbers pasted in.

Sources (the articles' own numbers are quoted in each test):
* "Do you want to learn AI, learn Cross-Entropy First?" (M. Pardeshi): the England/India
  prediction (0.81 bits for 75 % / 25 %, 1 bit for 50 / 50, 0 for 100 / 0) and the cat
  prediction Q1 = [0.4, 0.3, 0.1, 0.1] for P1 = [1, 0, 0, 0] (cross-entropy "1.3").
* "Entropy and Cross-Entropy": the car / bike / plane / boat prediction
  [0.775, 0.116, 0.039, 0.070] for [1, 0, 0, 0] (0.3677), the three containers of cubes and
  spheres, and the "after training" loss of 0.095.
* "Understanding Cross Entropy Loss": entropy <= cross-entropy with equality iff p = q, and
  Keras's binary / categorical / sparse categorical losses measure the same thing.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

import xent_jax
from tests.tolerances import assert_close

DTYPES = [np.float32, np.float64]
LN2 = np.log(2.0)


def _bits(fn, dtype, *arrays, **kwargs):
    """Calls ``fn`` on ``arrays`` in ``dtype`` (x64 on for float64) and returns numpy float64."""
    arrays = [np.asarray(a, dtype) if np.asarray(a).dtype.kind == "f" else a for a in arrays]
    with jax.enable_x64(dtype == np.float64):
        return np.asarray(fn(*arrays, **kwargs), np.float64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("p", "bits", "rounded"),
    [
        ([0.75, 0.25], -(0.75 * np.log2(0.75) + 0.25 * np.log2(0.25)), 0.811),
        ([0.5, 0.5], 1.0, 1.0),
        ([1.0, 0.0], 0.0, 0.0),
    ],
    ids=["england_75_india_25", "fifty_fifty", "certain"],
)
def test_world_cup_prediction_entropy(p, bits, rounded, dtype):
    out = _bits(xent_jax.entropy, dtype, p, base=2)
    assert_close(out, bits, dtype)
    assert round(float(out), 3) == rounded
    binary = _bits(xent_jax.binary_entropy, dtype, p[0], base=2)
    assert_close(binary, bits, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_equals_entropy_only_when_prediction_is_exact(dtype):
    p = np.array([0.75, 0.25])
    same = _bits(xent_jax.cross_entropy, dtype, p, p, base=2)
    assert_close(same, _bits(xent_jax.entropy, dtype, p, base=2), dtype)
    assert _bits(xent_jax.cross_entropy, dtype, p, np.array([0.6, 0.4]), base=2) > same


@pytest.mark.parametrize("dtype", DTYPES)
def test_cat_prediction_costs_about_1_32_bits(dtype):
    # The article's Q1 = [0.4, 0.3, 0.1, 0.1] sums to 0.9; the information-theory API does not
    # renormalise, so H(P1, Q1) = -log2(0.4) = 1.3219 exactly as the article computes it.
    p1 = np.array([1.0, 0.0, 0.0, 0.0])
    q1 = np.array([0.4, 0.3, 0.1, 0.1])
    out = _bits(xent_jax.cross_entropy, dtype, p1, q1, base=2)
    assert_close(out, -np.log2(0.4), dtype)
    assert round(float(out), 4) == 1.3219
    assert round(float(out), 1) == 1.3  # the article's "1.3"


CAR_TRUTH = np.array([1.0, 0.0, 0.0, 0.0])
CAR_PREDICTION = np.array([0.775, 0.116, 0.039, 0.070])
CAR_BITS = -np.log2(0.775)


@pytest.mark.parametrize("dtype", DTYPES)
def test_car_prediction_costs_0_3677_bits(dtype):
    out = _bits(xent_jax.cross_entropy, dtype, CAR_TRUTH, CAR_PREDICTION, base=2)
    assert_close(out, CAR_BITS, dtype)
    assert round(float(out), 4) == 0.3677
    # The same number from the Keras-style loss on the probabilities, and from logits whose
    # softmax is the prediction (the article's softmax layer), converted from nats.
    nats = _bits(xent_jax.categorical_cross_entropy, dtype, CAR_PREDICTION, CAR_TRUTH)
    assert_close(nats / LN2, CAR_BITS, dtype)
    logits = np.log(CAR_PREDICTION) + 1.7  # any shift: softmax(logits) == prediction
    nats = _bits(xent_jax.softmax_cross_entropy, dtype, logits, CAR_TRUTH)
    assert_close(nats / LN2, CAR_BITS, dtype)
    nats = _bits(xent_jax.softmax_cross_entropy_with_integer_labels, dtype, logits, np.array(0))
    assert_close(nats / LN2, CAR_BITS, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("counts", "rounded_bits"),
    [((26, 4), 0.5665), ((14, 16), 0.9968), ((30, 0), 0.0)],
    ids=["container1_26_cubes_4_spheres", "container2_14_spheres_16_cubes", "container3_spheres"],
)
def test_container_entropies(counts, rounded_bits, dtype):
    p = np.array(counts) / 30.0
    nonzero = p[p > 0]
    exact = -(nonzero * np.log2(nonzero)).sum()
    out = _bits(xent_jax.entropy, dtype, p, base=2)
    assert_close(out, exact, dtype)
    assert round(float(out), 4) == rounded_bits


@pytest.mark.parametrize("dtype", DTYPES)
def test_containers_order_by_certainty(dtype):
    entropies = [
        float(_bits(xent_jax.entropy, dtype, np.array(c) / 30.0, base=2))
        for c in ((30, 0), (26, 4), (14, 16))
    ]
    assert entropies == sorted(entropies)


@pytest.mark.parametrize("dtype", DTYPES)
def test_after_training_loss_is_0_095_bits(dtype):
    # The article reports 0.095 after training but does not print the prediction vector that
    # produced it. Any prediction giving the car probability 2**-0.095 costs exactly 0.095
    # bits; here the remaining mass is spread evenly over the three other classes.
    p_car = 2.0**-0.095
    prediction = np.array([p_car, *[(1 - p_car) / 3] * 3])
    out = _bits(xent_jax.cross_entropy, dtype, CAR_TRUTH, prediction, base=2)
    assert_close(out, 0.095, dtype)
    before = _bits(xent_jax.cross_entropy, dtype, CAR_TRUTH, CAR_PREDICTION, base=2)
    assert out < before


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("two_class", "truth"),
    [([0.75, 0.25], 0), ([0.25, 0.75], 1), ([0.775, 0.225], 0)],
    ids=["england_wins", "india_wins", "car_vs_rest"],
)
def test_binary_categorical_sparse_agree(two_class, truth, dtype):
    two_class = np.array(two_class)
    one_hot = np.eye(2)[truth]
    expected = -np.log(two_class[truth])
    binary = _bits(xent_jax.binary_cross_entropy, dtype, two_class[0], float(truth == 0))
    categorical = _bits(xent_jax.categorical_cross_entropy, dtype, two_class, one_hot)
    sparse = _bits(xent_jax.sparse_categorical_cross_entropy, dtype, two_class, np.array(truth))
    for value in (binary, categorical, sparse):
        assert_close(value, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse_label_zero_is_the_car_one_hot(dtype):
    sparse = _bits(
        xent_jax.sparse_categorical_cross_entropy, dtype, CAR_PREDICTION[None], np.array([0])
    )
    dense = _bits(xent_jax.categorical_cross_entropy, dtype, CAR_PREDICTION[None], CAR_TRUTH[None])
    assert_close(sparse, dense, dtype)
    assert_close(sparse / LN2, [CAR_BITS], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sigmoid_bce_from_logits_equals_bce_on_sigmoid(dtype):
    logits = np.array([-6.0, -2.5, -0.3, 0.0, 0.4, np.log(0.775 / 0.225), 3.0, 7.5])
    labels = np.array([0.0, 1.0, 0.0, 1.0, 0.3, 1.0, 0.0, 1.0])
    probs = 1.0 / (1.0 + np.exp(-logits))
    from_logits = _bits(xent_jax.sigmoid_binary_cross_entropy, dtype, logits, labels)
    from_probs = _bits(xent_jax.binary_cross_entropy, dtype, probs, labels)
    assert_close(from_logits, from_probs, dtype)
    assert_close(from_logits[5] / LN2, CAR_BITS, dtype)
