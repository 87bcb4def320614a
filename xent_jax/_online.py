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
``lax.platform_dependent`` (``by_platform``, which the sigmoid loss's fused sum uses too); its
tests also run it on the CPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from xent_jax import _validation as v


def _merge(left, right):
    """Combines two partial (max, sum of exp(z - max), *plain sums) tuples of a row.

    One exponential per merge: the part with the larger maximum keeps its sum as it is, the
    other is rescaled (two exponentials would make the pass compute-bound on a GPU in bfloat16).
    """
    m1, s1, *rest1 = left
    m2, s2, *rest2 = right
    swap = m1 < m2  # False for a NaN maximum on either side: the NaN then reaches the sum
    high, low = jnp.where(swap, m2, m1), jnp.where(swap, m1, m2)
    s_high, s_low = jnp.where(swap, s2, s1), jnp.where(swap, s1, s2)
    # Equal maxima take a factor of 1: -inf - -inf (empty parts) would be NaN.
    s = s_high + s_low * jnp.exp(jnp.where(low == high, 0, low - high))
    return (high, s, *(a + b for a, b in zip(rest1, rest2, strict=True)))


def online_row_sums(z: jax.Array, *summands: jax.Array) -> tuple[jax.Array, ...]:
    """``(max_c z_c, sum_c exp(z_c - max), *sum_c summand_c)`` along the last axis, in one pass.

    ``z`` and the summands are in the compute dtype (float32 / float64) and broadcast to
    ``z.shape``; a row of ``-inf`` gives ``(-inf, count, ...)``.
    """
    zero = jnp.zeros((), z.dtype)
    operands = (z, jnp.ones_like(z), *(jnp.broadcast_to(s, z.shape) for s in summands))
    init = (jnp.asarray(-jnp.inf, z.dtype), zero, *(zero for _ in summands))
    return tuple(lax.reduce(operands, init, _merge, (z.ndim - 1,)))


def _lse(row_max: jax.Array, log_sum: jax.Array) -> jax.Array:
    # A +inf logit makes the careful path's exp(inf - inf) NaN: the same here (loud).
    return jnp.where(row_max == jnp.inf, jnp.nan, row_max + log_sum)


def _smoothing_sums(z, weights) -> tuple[jax.Array, ...]:
    """Summands for ``sum_c w_c z_c``, ``sum_c w_c`` and the count over available classes."""
    available = z != -jnp.inf
    count = jnp.where(available, 1, 0).astype(z.dtype)
    if weights is None:
        return jnp.where(available, z, 0), count
    w = jnp.broadcast_to(weights.astype(z.dtype), z.shape)
    return jnp.where(available, w * z, 0), jnp.where(available, w, 0), count


def _smoothing_stats(lse, sums, weights):
    """(smooth, smooth_weight, num_available): ``sum_c w_c (lse - z_c)`` over available classes.

    No cancellation to fear: ``lse >= mean(z) + log(K)`` (Jensen), so each row's smooth term is
    at least ``log(K)`` per unit of weight.
    """
    if weights is None:
        weighted_z, count = sums
        weight = count
    else:
        weighted_z, weight, count = sums
    # No available class (or zero weight): the sum is empty, 0, as on the careful path.
    smooth = jnp.where(weight == 0, 0, weight * lse - weighted_z)
    return smooth, weight, count


def integer_statistics(given, label_logits, weights, smoothing: bool):
    """(nll, lse, smooth, smooth_weight, num_available) for integer labels, one pass."""
    z = given.astype(v.compute_dtype(given.dtype))
    row_max, sum_exp, *sums = online_row_sums(
        z, *(_smoothing_sums(z, weights) if smoothing else ())
    )
    log_sum = jnp.log(sum_exp)
    lse = _lse(row_max, log_sum)
    # Around the row maximum: no cancellation against a large lse when the label wins.
    nll = jnp.where(jnp.isfinite(row_max), (row_max - label_logits) + log_sum, lse - label_logits)
    if not smoothing:
        return nll, lse, jnp.zeros_like(nll), jnp.ones_like(nll), jnp.ones_like(nll)
    return nll, lse, *_smoothing_stats(lse, sums, weights)


def dense_statistics(given_z, given_targets, weights, smoothing: bool):
    """(nll, lse, smooth, smooth_weight, num_available, mass) for dense targets, one pass."""
    dtype = v.compute_dtype(given_z.dtype)
    z, targets = given_z.astype(dtype), given_targets.astype(dtype)
    # 0 * log 0 = 0: a class without target mass never contributes, even at a -inf logit.
    weighted = jnp.where(targets == 0, 0, targets * z)
    extra = _smoothing_sums(z, weights) if smoothing else ()
    row_max, sum_exp, mass, dot, *sums = online_row_sums(z, targets, weighted, *extra)
    log_sum = jnp.log(sum_exp)
    lse = _lse(row_max, log_sum)
    # nll = sum_c t_c (lse - z_c) around the target-weighted mean logit (as on the CPU path):
    # exact when one class holds all the mass, and no cancellation against a large lse.
    has_mass = mass > 0
    hint = jnp.where(has_mass, dot / jnp.where(has_mass, mass, 1), 0)
    hint = jnp.where(jnp.isfinite(hint), hint, 0)
    around = mass * ((row_max - hint) + log_sum) + (mass * hint - dot)
    # A row without a finite maximum: the careful path's sum_c t_c (lse_or_zero - z_c).
    fallback = mass * jnp.where(lse == -jnp.inf, 0, lse) - dot
    nll = jnp.where(jnp.isfinite(row_max), around, fallback)
    if not smoothing:
        return nll, lse, jnp.zeros_like(nll), jnp.ones_like(nll), jnp.ones_like(nll), mass
    return nll, lse, *_smoothing_stats(lse, sums, weights), mass


# Tests set this to run the one-pass formulation on the CPU too (see tests/test_online.py).
_EVERYWHERE = False


def pays_off(dtype) -> bool:
    """Whether accelerators use the one-pass formulation for logits of this dtype."""
    return _EVERYWHERE or jnp.dtype(dtype).itemsize >= 4


def by_platform(cpu, accelerator, *args):
    """``cpu(*args)`` when lowering for the CPU, ``accelerator(*args)`` for a GPU or TPU.

    Under a trace the choice is made per lowering platform (``lax.platform_dependent``: only
    the chosen branch is compiled). Eagerly, the arrays' devices decide, without a ``switch``
    (whose fresh closures would be recompiled at every eager call).
    """
    if _EVERYWHERE:
        return accelerator(*args)
    leaves = jax.tree_util.tree_leaves(args)
    if any(isinstance(x, jax.core.Tracer) for x in leaves):
        return lax.platform_dependent(*args, cpu=cpu, default=accelerator)
    platforms = {d.platform for x in leaves if isinstance(x, jax.Array) for d in x.devices()}
    return cpu(*args) if platforms <= {"cpu"} else accelerator(*args)
