"""Softmax cross-entropy row statistics in one read of the logits, for GPUs and TPUs.

The CPU formulation (``_softmax``) sums ``exp(z_c)`` around a hint and falls back to a careful
max-shifted pass under ``lax.cond`` when a row is out of range. On a GPU, XLA evaluates both
branches of that ``cond`` (it turns it into a select), so the forward pass reads the logits
twice: once for the row maximum and once for the sum. Here the maximum and the sum of
exponentials are carried together through one variadic reduction (the "online" softmax
normaliser, Milakov & Gimelshein 2018), with every other row sum the loss needs in the same
pass; it is max-shifted, so there is no range check and no fallback, and a GPU runs it at
about the speed of reading the logits once.

Only for float32 / float64 logits: the merge costs more arithmetic per element than a plain
sum, which a GPU hides behind 4-byte reads but not behind 2-byte ones. Measured on an H100
(``BENCHMARKS.md``), the bfloat16 forward took 0.39 ms this way and 0.21 ms with the hinted
formulation, whose maximum and sum XLA computes in one fused pass there; half-precision logits
therefore keep the hinted formulation on every platform (``pays_off``).

The results follow the careful path's conventions exactly: a row whose logits are all ``-inf``
has ``lse = -inf``; a ``+inf`` or NaN logit makes ``lse`` NaN (loud); ``-inf`` logits are
unavailable classes for label smoothing. ``_softmax`` picks this formulation per platform with
``lax.platform_dependent`` (:mod:`xent_jax._platform`, which the sigmoid loss's fused sum uses
too); ``xent_jax.softmax_formulation("one_pass")`` runs it on the CPU, as its tests do.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from xent_jax import _validation as v


def _merger(num_centred: int):
    """The merge of two partial row states ``(max, sum of exp(z - max), *centred, *plain)``.

    Each of the ``num_centred`` pairs ``(W, C)`` holds ``W = sum_c w_c`` and
    ``C = sum_c w_c (z_c - max)``: a weighted sum of the logits kept relative to the running
    maximum, so that ``sum_c w_c (lse - z_c) = W log(sum_exp) - C`` never subtracts two large
    numbers (a raw ``sum_c w_c z_c`` loses the digits of logits that share a large offset).
    """

    def merge(left, right):
        m1, s1, *rest1 = left
        m2, s2, *rest2 = right
        swap = m1 < m2  # False for a NaN maximum on either side: the NaN then reaches the sum
        high, low = jnp.where(swap, m2, m1), jnp.where(swap, m1, m2)
        s_high, s_low = jnp.where(swap, s2, s1), jnp.where(swap, s1, s2)
        # One exponential per merge: only the part with the smaller maximum is rescaled. Equal
        # maxima take a factor of 1 (-inf - -inf, for empty parts, would be NaN).
        s = s_high + s_low * jnp.exp(jnp.where(low == high, 0, low - high))
        merged = [high, s]
        for k in range(num_centred):
            w1, c1, w2, c2 = rest1[2 * k], rest1[2 * k + 1], rest2[2 * k], rest2[2 * k + 1]
            w_low = jnp.where(swap, w1, w2)
            # Re-centre the lower part on the higher maximum; nothing to move without weight
            # or between equal maxima (both -inf, say).
            moved = jnp.where((w_low == 0) | (low == high), 0, w_low * (low - high))
            merged += [w1 + w2, c1 + c2 + moved]
        plain = zip(rest1[2 * num_centred :], rest2[2 * num_centred :], strict=True)
        return (*merged, *(a + b for a, b in plain))

    return merge


def online_row_sums(
    z: jax.Array, *summands: jax.Array, centred_weights: tuple[jax.Array, ...] = ()
) -> tuple[jax.Array, ...]:
    """Row statistics along the last axis in one pass over ``z``.

    Returns ``(max_c z_c, sum_c exp(z_c - max), *[sum_c w_c, sum_c w_c (z_c - max)] for each w
    in centred_weights, *sum_c summand_c)``. Weights are 0 for classes to leave out. Everything
    is in the compute dtype (float32 / float64) and broadcasts to ``z.shape``; a row of ``-inf``
    gives ``(-inf, count, ...)``.
    """
    zero = jnp.zeros((), z.dtype)
    centred = []
    for w in centred_weights:
        # Each element is a part of its own: its centred sum w (z - z) is 0.
        centred += [jnp.broadcast_to(w, z.shape), jnp.zeros_like(z)]
    plain = [jnp.broadcast_to(s, z.shape) for s in summands]
    operands = (z, jnp.ones_like(z), *centred, *plain)
    init = (jnp.asarray(-jnp.inf, z.dtype), *(zero for _ in operands[1:]))
    merge = _merger(len(centred_weights))
    return tuple(lax.reduce(operands, init, merge, (z.ndim - 1,)))


def _lse(row_max: jax.Array, log_sum: jax.Array) -> jax.Array:
    # A +inf logit makes the careful path's exp(inf - inf) NaN: the same here (loud).
    return jnp.where(row_max == jnp.inf, jnp.nan, row_max + log_sum)


def _smoothing_inputs(z, weights):
    """(centred weights, plain summands): the weights of available classes and their count."""
    available = z != -jnp.inf
    count = jnp.where(available, 1, 0).astype(z.dtype)
    if weights is None:
        return (count,), ()
    w = jnp.broadcast_to(weights.astype(z.dtype), z.shape)
    return (jnp.where(available, w, 0),), (count,)


def _smoothing_stats(lse, log_sum, sums, weights):
    """(smooth, smooth_weight, num_available): ``sum_c w_c (lse - z_c)`` over available classes.

    ``sums`` starts with ``(W, C)`` of ``online_row_sums``: ``sum_c w_c (lse - z_c)`` is
    ``W log(sum_exp) - C``, with no large terms to cancel.
    """
    weight, centred, *rest = sums
    count = weight if weights is None else rest[0]
    # An empty row (W = 0, C = 0) gives 0, as on the careful path; a NaN lse gives NaN.
    smooth = jnp.where(jnp.isnan(lse), jnp.nan, weight * log_sum - centred)
    return smooth, weight, count


def integer_statistics(given, label_logits, weights, smoothing: bool):
    """(nll, lse, smooth, smooth_weight, num_available) for integer labels, one pass."""
    z = given.astype(v.compute_dtype(given.dtype))
    centred, plain = _smoothing_inputs(z, weights) if smoothing else ((), ())
    row_max, sum_exp, *sums = online_row_sums(z, *plain, centred_weights=centred)
    log_sum = jnp.log(sum_exp)
    lse = _lse(row_max, log_sum)
    # Around the row maximum: no cancellation against a large lse when the label wins.
    nll = jnp.where(jnp.isfinite(row_max), (row_max - label_logits) + log_sum, lse - label_logits)
    if not smoothing:
        return nll, lse, jnp.zeros_like(nll), jnp.ones_like(nll), jnp.ones_like(nll)
    return nll, lse, *_smoothing_stats(lse, log_sum, sums, weights)


def dense_statistics(given_z, given_targets, weights, smoothing: bool):
    """(nll, lse, smooth, smooth_weight, num_available, mass) for dense targets, one pass."""
    dtype = v.compute_dtype(given_z.dtype)
    z, targets = given_z.astype(dtype), given_targets.astype(dtype)
    has_target = targets != 0
    # 0 * log 0 = 0: a class without target mass never contributes, even at a -inf logit.
    target_weights = jnp.where(has_target, targets, 0)
    raw_dot = jnp.where(has_target, targets * z, 0)
    is_target = jnp.where(has_target, 1, 0).astype(dtype)
    centred, plain = _smoothing_inputs(z, weights) if smoothing else ((), ())
    row_max, sum_exp, mass, centred_dot, *sums = online_row_sums(
        z, raw_dot, is_target, *plain, centred_weights=(target_weights, *centred)
    )
    # The smoothing pair (W, C) comes before the plain sums, its count (if any) after them.
    pair = 2 * len(centred)
    dot, num_targets = sums[pair : pair + 2]
    sums = [*sums[:pair], *sums[pair + 2 :]]
    log_sum = jnp.log(sum_exp)
    lse = _lse(row_max, log_sum)
    # nll = sum_c t_c (lse - z_c) = mass log(sum_exp) - sum_c t_c (z_c - max): no large terms
    # to cancel; exactly (max - z_y) + log(sum_exp) when one class holds all the mass.
    around = mass * log_sum - centred_dot
    # A row without a finite maximum, or with target mass on infinite logits: the careful
    # path's sum_c t_c (lse_or_zero - z_c). The plain sum ``dot`` is NaN for infinities of
    # both signs in any merge order, where the centred sums could cancel them.
    fallback = mass * jnp.where(lse == -jnp.inf, 0, lse) - dot
    nll = jnp.where(jnp.isfinite(row_max) & jnp.isfinite(dot), around, fallback)
    # A row without any target is exactly 0, whatever its logits (NaN and +inf included).
    nll = jnp.where(num_targets == 0, 0, nll)
    if not smoothing:
        return nll, lse, jnp.zeros_like(nll), jnp.ones_like(nll), jnp.ones_like(nll), mass
    return nll, lse, *_smoothing_stats(lse, log_sum, sums, weights), mass
