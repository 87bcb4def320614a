"""What language-model trainers need from the fused loss: temperature, ``shift=True``, per-token
float weights, a normaliser that survives gradient accumulation and data parallelism, the aux
outputs (logsumexp, entropy, label log-probability; the first two differentiable), bfloat16
inputs without drift, and no index overflow past 2**31 logits.

Every check compares the fused loss with the materialised one (``x @ w`` and the plain loss, or
plain ``jax.numpy`` formulas), in float64 where the comparison is meant to be exact.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xent_jax
from tests.tolerances import tolerance

fused = xent_jax.linear_softmax_cross_entropy_with_integer_labels
plain = xent_jax.softmax_cross_entropy_with_integer_labels
# Small blocks that divide nothing, so the tiles schedule runs several blocks and tiles; the
# default runs the strip schedule for "sum" / "mean".
SCHEDULES = {"strip": {}, "tiles": {"block_size_tokens": 5, "block_size_vocab": 7}}
F64 = tolerance(jnp.float64)


def _data(n=12, d=4, v=19, seed=0, batch=None):
    rng = np.random.default_rng(seed)
    shape = (n,) if batch is None else batch
    x = rng.normal(size=(*shape, d))
    w = rng.normal(size=(d, v)) * 0.7
    y = rng.integers(0, v, size=shape)
    return jnp.asarray(x), jnp.asarray(w), jnp.asarray(y)


def _grads(loss, x, w):
    return jax.grad(loss, argnums=(0, 1))(x, w)


def _assert_close(a, b, tol=F64):
    for left, right in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(left, right, **tol)


@pytest.fixture(autouse=True)
def _float64():
    with jax.enable_x64(True):
        yield


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_temperature_matches_materialised(schedule, reduction):
    x, w, y = _data()
    options = {"temperature": 0.7, "logit_softcap": 3.0, "z_loss": 0.01, "label_smoothing": 0.1}
    ours = lambda x, w: jnp.sum(
        fused(x, w, y, reduction=reduction, **options, **SCHEDULES[schedule])
    )
    # The definition: the softmax sees softcap(z) / T.
    capped = lambda x, w: 3.0 * jnp.tanh((x @ w) / 3.0) / 0.7
    reference = lambda x, w: jnp.sum(
        plain(capped(x, w), y, reduction=reduction, z_loss=0.01, label_smoothing=0.1)
    )
    _assert_close(ours(x, w), reference(x, w))
    _assert_close(_grads(ours, x, w), _grads(reference, x, w))
    materialised = lambda x, w: jnp.sum(plain(x @ w, y, reduction=reduction, **options))
    _assert_close(_grads(materialised, x, w), _grads(reference, x, w))


def test_temperature_in_the_closed_form_gradient():
    x, w, y = _data()
    z = x @ w
    options = {"temperature": 2.5, "logit_softcap": 4.0, "ignore_index": int(y[0])}
    autodiff = jax.grad(lambda z: plain(z, y, reduction="sum", **options))(z)
    closed = xent_jax.analytic.softmax_cross_entropy_with_integer_labels_grad(
        z, y, reduction="sum", **options
    )
    _assert_close(autodiff, closed)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_shift_predicts_the_next_token(schedule):
    x, w, tokens = _data(batch=(3, 6))
    mask = jnp.asarray(np.random.default_rng(1).random((3, 6)) > 0.2)  # padding of the tokens
    ours = lambda x, w: fused(
        x, w, tokens, shift=True, where=mask, reduction="mean", **SCHEDULES[schedule]
    )
    reference = lambda x, w: plain(
        x[:, :-1] @ w, tokens[:, 1:], where=mask[:, 1:], reduction="mean"
    )
    _assert_close(ours(x, w), reference(x, w))
    _assert_close(_grads(ours, x, w), _grads(reference, x, w))
    per_token = fused(x, w, tokens, shift=True, **SCHEDULES[schedule])
    assert per_token.shape == (3, 6) and not np.asarray(per_token[:, -1]).any()


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_float_weights_and_downstream_gradients(schedule):
    # reduction="none" used downstream: the gradient of sum(loss * g) for an arbitrary g.
    x, w, y = _data()
    rng = np.random.default_rng(2)
    weights = jnp.asarray(rng.random(12) * (rng.random(12) > 0.3))
    g = jnp.asarray(rng.normal(size=12))
    options = {"label_smoothing": 0.2, "class_weights": jnp.linspace(0.5, 1.5, 19)}
    ours = lambda x, w: jnp.sum(g * fused(x, w, y, where=weights, **options, **SCHEDULES[schedule]))
    reference = lambda x, w: jnp.sum(g * weights * plain(x @ w, y, **options))
    _assert_close(ours(x, w), reference(x, w))
    _assert_close(_grads(ours, x, w), _grads(reference, x, w))
    # The mean divides by the summed token weight times the label's class weight.
    mean = lambda x, w: fused(
        x, w, y, where=weights, reduction="mean", **options, **SCHEDULES[schedule]
    )
    w_y = options["class_weights"][y]
    mean_ref = lambda x, w: jnp.sum(weights * plain(x @ w, y, **options)) / jnp.sum(weights * w_y)
    _assert_close(mean(x, w), mean_ref(x, w))
    _assert_close(_grads(mean, x, w), _grads(mean_ref, x, w))
    with pytest.raises(TypeError, match="no derivative with respect to where"):
        jax.grad(lambda s: fused(x, w, y, where=weights * s, reduction="sum"))(1.0)


def test_normalizer_gives_the_one_batch_mean_over_micro_batches():
    x, w, y = _data(n=20)
    y = y.at[3:9].set(-100)  # padding, unevenly spread over the micro-batches
    whole = lambda x, w: fused(x, w, y, ignore_index=-100, reduction="mean")
    total = jnp.sum(y != -100)
    splits = [slice(0, 3), slice(3, 9), slice(9, 20)]  # different lengths; the middle one padded

    def accumulated(x, w):
        parts = [
            fused(x[s], w, y[s], ignore_index=-100, reduction="mean", normalizer=total)
            for s in splits
        ]
        return sum(parts)

    _assert_close(accumulated(x, w), whole(x, w))
    _assert_close(_grads(accumulated, x, w), _grads(whole, x, w))
    # With reduction="sum", the aux weight_sum gives the same mean without knowing the total.
    sums = [
        fused(x[s], w, y[s], ignore_index=-100, reduction="sum", return_aux=True) for s in splits
    ]
    mean = sum(loss for loss, _ in sums) / sum(aux.weight_sum for _, aux in sums)
    _assert_close(mean, whole(x, w))


def test_a_fully_padded_shard_gives_zero_not_nan():
    x, w, _ = _data(n=6)
    y = jnp.full((6,), -100)
    call = functools.partial(fused, w=w, labels=y, ignore_index=-100, reduction="mean")
    for normalizer in (None, 0.0, 17.0):
        loss, grads = jax.value_and_grad(lambda x, n=normalizer: call(x, normalizer=n))(x)
        assert float(loss) == 0.0 and not np.asarray(grads).any()


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_aux_outputs_and_their_gradients(schedule, reduction):
    x, w, y = _data()
    y = y.at[2].set(-1)  # ignored
    options = {"ignore_index": -1, "temperature": 1.3, "logit_softcap": 5.0}

    def call(x, w):
        return fused(
            x, w, y, reduction=reduction, return_aux=True, **options, **SCHEDULES[schedule]
        )

    _, aux = call(x, w)
    z = 5.0 * jnp.tanh((x @ w) / 5.0) / 1.3
    valid = y != -1
    log_p = jax.nn.log_softmax(z, axis=-1)
    entropy = -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)
    label_lp = jnp.take_along_axis(log_p, jnp.maximum(y, 0)[:, None], axis=-1)[:, 0]
    _assert_close(aux.entropy, jnp.where(valid, entropy, 0))
    _assert_close(aux.label_logprob, jnp.where(valid, label_lp, 0))
    _assert_close(aux.logsumexp, jnp.where(valid, jax.nn.logsumexp(z, axis=-1), 0))
    _assert_close(aux.weight_sum, jnp.sum(valid))
    # One objective mixing the loss and the differentiable aux outputs (a z-loss variant and a
    # policy-gradient term): the same gradient as materialised.
    g = jnp.asarray(np.random.default_rng(3).normal(size=12))

    def objective(x, w):
        loss, aux = call(x, w)
        return jnp.sum(loss) + 0.1 * jnp.sum(aux.logsumexp**2) + jnp.sum(g * aux.label_logprob)

    def materialised(x, w):
        z = 5.0 * jnp.tanh((x @ w) / 5.0) / 1.3
        log_p = jax.nn.log_softmax(z, axis=-1)
        lp = jnp.take_along_axis(log_p, jnp.maximum(y, 0)[:, None], axis=-1)[:, 0]
        lse = jnp.where(valid, jax.nn.logsumexp(z, axis=-1), 0)
        loss = plain(x @ w, y, reduction=reduction, **options)
        return jnp.sum(loss) + 0.1 * jnp.sum(lse**2) + jnp.sum(g * jnp.where(valid, lp, 0))

    _assert_close(_grads(objective, x, w), _grads(materialised, x, w))


@functools.cache
def _bf16_drift() -> dict:
    rng = np.random.default_rng(4)
    n, d, v = 256, 64, 4096
    x = jnp.asarray(rng.normal(size=(n, d)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(d, v)) * 0.2, jnp.bfloat16)
    y = jnp.asarray(rng.integers(0, v, size=n))
    with jax.enable_x64(True):
        exact = plain(x.astype(jnp.float64) @ w.astype(jnp.float64), y, reduction="mean")
        ours = fused(x, w, y, reduction="mean")
        bf16_logits = plain(jnp.dot(x, w), y, reduction="mean")  # logits rounded to bfloat16
    rel = lambda a: float(abs(a - exact) / exact)
    return {"fused": rel(ours), "bf16_logits": rel(bf16_logits)}


def test_bfloat16_inputs_do_not_drift():
    # bf16 hidden states and weights, float32 accumulation: within float32 rounding of the
    # float64 loss on the same (bf16) inputs; materialising bf16 logits drifts by ~1e-3.
    drift = _bf16_drift()
    assert drift["fused"] <= tolerance(jnp.float32)["rtol"], drift
    assert drift["bf16_logits"] > 10 * drift["fused"], drift


@pytest.mark.slow
def test_no_index_overflow_beyond_2_to_31_logits():
    # N * V = 65536 * 32769 > 2**31: rows at both ends against a float64 reference.
    n, v, d = 65536, 32769, 2
    rng = np.random.default_rng(5)
    x = rng.normal(size=(n, d)).astype(np.float32)
    w = rng.normal(size=(d, v)).astype(np.float32)
    y = rng.integers(0, v, size=n).astype(np.int32)
    y[-1] = v - 1
    with jax.enable_x64(False):
        losses = np.asarray(jax.jit(lambda x, w, y: fused(x, w, y))(x, w, y))
    rows = np.r_[0:4, n - 4 : n]
    z = x[rows].astype(np.float64) @ w.astype(np.float64)
    top = z.max(axis=1)
    expected = np.log(np.exp(z - top[:, None]).sum(axis=1)) + top - z[np.arange(8), y[rows]]
    np.testing.assert_allclose(losses[rows], expected, **tolerance(jnp.float32))
