"""Softmax cross-entropy from logits, with dense (soft) labels and with integer labels.

How the work is laid out (it decides the speed; measured in ``research/benchmark.py``, figures in
``BENCHMARKS.md``):

* **One reduction pass over the logits** in the common case, with no per-element shift. The
  log-normaliser is taken relative to a *hint*, the label logit (integer labels) or the
  target-weighted mean logit (dense labels), instead of the row maximum:
  ``sum_c exp(z_c - hint)`` is computed as ``exp(-hint) * sum_c exp(z_c)`` (on XLA:CPU the
  broadcast subtraction inside the pass costs about 30% of it). The product is at least about 1
  (the hint's own class), and with the label logit as the hint the loss is its logarithm, with
  no cancellation against a large log-normaliser. The fast path is used while every row's raw
  sum and scale are normal numbers (logits within about +-80 in float32); if any row is out of
  range, or holds ``-inf``, ``+inf`` or NaN, the whole batch is recomputed the careful way (max
  shift, availability masks) under ``lax.cond``; values agree to rounding either way.
* **Per platform.** That is the CPU's formulation (and every platform's for half-precision
  logits). On GPUs and TPUs, float32 / float64 logits take the one-pass max-and-sum reduction of
  ``xent_jax._online`` instead (XLA:GPU evaluates both branches of the ``lax.cond`` above, i.e.
  reads the logits twice); ``lax.platform_dependent`` compiles only the chosen one.
* **One elementwise pass for the gradient.** The per-row statistics come from ``jax.custom_jvp``
  functions whose tangent is ``sum(g * dz)`` with ``g`` built from ``exp(z - lse)`` recomputed
  from the logits. Transposed by ``jax.grad`` that is a single fused pass that writes ``ct * g``
  once: no one-hot array, no scatter, no saved softmax, and the cast back to a half-precision
  input dtype happens in the same pass. The rules are plain ``jax.numpy`` that call the functions
  they define, so they differentiate again: ``jax.hessian`` gives ``diag(p) - p p^T`` exactly and
  forward mode works.
* **No ``where`` feeds a reduction on the fast path**: XLA:CPU materialises a select in front of
  a reduction as a full temporary array. Options add per-row work only (ignore_index, z-loss,
  class weights), except label smoothing, which adds one sum over the logits.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero
from jax.typing import ArrayLike

from xent_jax import _mesh, _online
from xent_jax import _validation as v
from xent_jax._fused import vocab_parallel_integer_loss
from xent_jax._labels import prepare_integer_labels
from xent_jax._logits import collapse_class_axes, combine_masks, prepare_logits
from xent_jax._numerics import fast_or_careful
from xent_jax._numerics import upcast_alias as _upcast_alias
from xent_jax._options import SoftmaxOptions, softmax_options
from xent_jax._platform import by_platform, pays_off
from xent_jax._reduction import reduce_loss

# A row whose shifted sum of exponentials falls below this (or is not finite) sends the batch to
# the careful path: the mass of underflowed terms is then negligible against the sum.
_MIN_SUM = 1e-20
# Tags of the aliases of a half-precision input, one per pass (see _upcast_alias).
_GATHER, _SMOOTHING, _GRADIENT, _CAREFUL_SUMS, _MASS, _DOT = 1, 2, 3, 5, 6, 7


class _Options(NamedTuple):
    """Scalar loss options as arrays (so they may be traced), ``None`` when off."""

    label_smoothing: jax.Array | None
    z_loss: jax.Array | None


class _Rows(NamedTuple):
    """Per-row results along the class axis (the last one), before masks and the reduction.

    Attributes:
      loss: the per-example loss with every option applied.
      lse: the log-normaliser; ``-inf`` for a row whose logits are all ``-inf``.
      nll: ``sum_c t_c (lse - z_c)`` (integer labels: ``lse - z_y``), without label weights.
      smooth: ``sum_c w_c (lse - z_c)`` over the available classes (0 without smoothing).
      smooth_weight: ``sum_c w_c`` over the available classes (1 without smoothing).
      num_available: the number of available classes (1 without smoothing).
      mass: ``sum_c t_c`` (1 for integer labels).
    """

    loss: jax.Array
    lse: jax.Array
    nll: jax.Array
    smooth: jax.Array
    smooth_weight: jax.Array
    num_available: jax.Array
    mass: jax.Array


def _upcast(x: jax.Array) -> jax.Array:
    return x.astype(v.compute_dtype(x.dtype))


def _scaled_sum_exp(z: jax.Array, hint: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(``sum_c exp(z_c - hint)``, whether the fast path may use it) without shifting every element.

    Computed as ``exp(-hint) * sum_c exp(z_c)``: each term of the raw sum carries the same
    relative rounding as a shifted one while both factors are normal numbers. A raw sum below
    ``sqrt(tiny)`` could be dominated by subnormal terms, so such rows are reported unusable
    (as are overflow, NaN, a scale outside the normal range and a product out of range).
    """
    raw = jnp.sum(jnp.exp(z), axis=-1)
    scale = jnp.exp(-hint)
    total = raw * scale
    info = jnp.finfo(raw.dtype)
    usable = (raw >= np.sqrt(info.tiny)) & (raw <= info.max)
    usable = usable & (scale >= info.tiny) & (scale <= info.max) & _in_range(total)
    return total, usable


def _in_range(total: jax.Array) -> jax.Array:
    """Whether a shifted sum of exponentials is usable (False for NaN too)."""
    return (total >= _MIN_SUM) & (total <= jnp.finfo(total.dtype).max)


def _finite_or_zero(x: jax.Array) -> jax.Array:
    return jnp.where(jnp.isfinite(x), x, 0)


def _lse_or_zero(lse: jax.Array) -> jax.Array:
    """The log-normaliser with 0 for a row whose logits are all ``-inf``."""
    return jnp.where(lse == -jnp.inf, 0, lse)


def _row_sums(*values: jax.Array) -> tuple[jax.Array, ...]:
    """Sums along the last axis of several arrays in one variadic reduction.

    Used on the careful path only: XLA:CPU keeps a ``where`` inside this loop, where in front of
    a (faster) single-operand reduction it would write it out as a full temporary array.
    """
    zeros = tuple(jnp.zeros((), x.dtype) for x in values)
    add = lambda a, b: tuple(x + y for x, y in zip(a, b, strict=True))
    return tuple(jax.lax.reduce(values, zeros, add, (values[0].ndim - 1,)))


def _careful_statistics(
    given: jax.Array, weights, smoothing: bool, targets=None, mass=None, label_logits=None
):
    """The careful way: max-shifted, ``-inf`` logits as unavailable classes.

    Returns ``(lse, target_nll, smooth, smooth_weight, num_available)``: ``lse = -inf`` for a
    row whose logits are all ``-inf``; ``target_nll = sum_c t_c (lse - z_c)`` for dense
    ``targets`` of row sums ``mass``, a class without target mass contributing exactly 0, or
    ``lse - z_y`` for ``label_logits`` (``None`` without either).

    The row sums with a ``where`` are taken together in one variadic reduction: XLA:CPU keeps
    the ``where``s inside that loop, while one reduced on its own (all that ``jax.grad`` keeps of
    the class count, say) would be written out as a full array first. No logits-sized
    temporary either way (``tests/test_benchmark.py`` checks the whole program).
    """
    row_max = _upcast(jnp.max(given, axis=-1))  # exact in the input dtype
    empty = row_max == -jnp.inf
    shift = jnp.where(empty, 0, row_max)
    # Upcast directly (one pass of the logits), the targets through an alias (see _upcast_alias).
    z = _upcast(given)
    # Around -shift, not shift: a broadcast shared with the exponentials would be materialised.
    below = -(z + (-shift)[..., None])  # >= 0 for available classes: no sum below cancels
    terms = [jnp.exp(z - shift[..., None])]
    if targets is not None:
        t = _upcast_alias(targets, _CAREFUL_SUMS, z.dtype)
        terms.append(jnp.where(t == 0, 0, t * below))
    if smoothing:
        available = z != -jnp.inf
        count = jnp.where(available, 1, 0).astype(z.dtype)
        if weights is None:
            terms += [jnp.where(available, below, 0), count]
        else:
            available_weights = jnp.where(available, weights, 0).astype(z.dtype)
            terms += [jnp.where(available, below * weights, 0), available_weights, count]
    if len(terms) == 1 or (len(terms) > 2 and given.dtype.itemsize >= 4):
        # The exponentials in a (vectorised) reduction of their own, the rest together: 1.8x
        # faster than one variadic loop with smoothing on float32 (a lone sum with a ``where``
        # would be written out first, hence only with two or more others).
        sum_exp = jnp.sum(terms[0], axis=-1)
        sums = list(_row_sums(*terms[1:])) if len(terms) > 1 else []
    else:
        # Half precision: every sum in one variadic loop. Split, the passes' upcasts of the
        # input are merged and written out as float32 copies (up to 2 GiB at 8192x32768).
        sum_exp, *sums = _row_sums(*terms)
    # Double where: an empty row takes log(1) instead of log(0).
    log_total = jnp.log(jnp.where(empty, 1, sum_exp))
    lse = jnp.where(empty, -jnp.inf, log_total + shift)
    target_nll = None
    if targets is not None:
        assert mass is not None  # dense targets always come with their row sums (the caller's)
        # sum_c t_c (lse - z_c) = mass (lse - shift) + sum_c t_c (shift - z_c). A row without
        # targets is exactly 0 even when a NaN or +inf logit makes log_total NaN; any target
        # in such a row sees a non-finite shift - z_c, so NaN still reaches its loss.
        target_nll = jnp.where(mass == 0, 0, mass * log_total) + sums.pop(0)
    if label_logits is not None:
        # lse - z_y as (shift - z_y) + log_total: the large terms cancel first, exactly (lse - z_y
        # keeps only lse's ulp: 7.6e-6 for a true 8.4e-6 at logits [90, 78, 77]).
        target_nll = jnp.where(empty, lse - label_logits, (shift - label_logits) + log_total)
    if not smoothing:
        return lse, target_nll, *_no_smoothing(lse)
    below_sum, smooth_weight, num_available = sums[0], sums[1], sums[-1]
    # sum_c w_c (lse - z_c) = W (lse - shift) + sum_c w_c (shift - z_c); 0 for an empty row.
    return lse, target_nll, smooth_weight * log_total + below_sum, smooth_weight, num_available


def _centred_class_sum(given: jax.Array, hint: jax.Array, weights) -> jax.Array:
    """``sum_c w_c (hint - z_c)`` from the caller's logits (any float dtype)."""
    if weights is None and given.dtype == jnp.bfloat16:
        # sum_c (hint - z_c) = K hint - sum_c z_c, the raw sum upcast inside its own pass. The
        # alias is tied to the hint: with its constant tag alone XLA:CPU merged this upcast with
        # the exp pass's and wrote out a float32 copy, so this sum used to be a bfloat16 dot
        # with a ones matrix (8192x32768, options forward: 138 -> 96 ms; plain forward: 80).
        z = _upcast_alias(given, _SMOOTHING, tie=hint)
        return given.shape[-1] * hint - jnp.sum(z, axis=-1)
    z = _upcast_alias(given, _SMOOTHING)
    # Around -hint, not hint: a broadcast shared with another pass would be materialised as a
    # full array by XLA:CPU instead of being fused into the reduction.
    centred = -(z + (-hint)[..., None])
    return jnp.sum(centred if weights is None else weights * centred, axis=-1)


def _smoothing_fast(given, hint, offset, weights):
    """(smooth, smooth_weight, num_available, finite) assuming every class is available."""
    num_classes = given.shape[-1]
    dtype = offset.dtype
    centred_sum = _centred_class_sum(given, hint, weights)
    if weights is None:
        smooth_weight = jnp.full(offset.shape, num_classes, dtype)
    else:
        smooth_weight = jnp.broadcast_to(jnp.sum(weights), offset.shape)
    # sum_c w_c (lse - z_c) with lse = offset + hint, taken around the hint for accuracy.
    smooth = offset * smooth_weight + centred_sum
    num_available = jnp.full(offset.shape, num_classes, dtype)
    # A -inf, +inf or NaN logit anywhere makes the centred sum non-finite.
    return (smooth, smooth_weight, num_available), jnp.isfinite(centred_sum)


def _no_smoothing(like: jax.Array):
    return jnp.zeros_like(like), jnp.ones_like(like), jnp.ones_like(like)


def _combine(nll, lse, smooth, num_available, label_weights, options: _Options) -> jax.Array:
    """The per-example loss from the row statistics (the same formula on both paths)."""
    loss = nll if label_weights is None else nll * label_weights
    if options.label_smoothing is not None:
        eps = options.label_smoothing
        loss = (1 - eps) * loss + eps * smooth / jnp.maximum(num_available, 1)
    if options.z_loss is not None:
        loss = loss + options.z_loss * jnp.square(_lse_or_zero(lse))
    return loss


def _is_zero(tangent) -> bool:
    return tangent is None or isinstance(tangent, SymbolicZero)


def _option_tangents(rows: _Rows, nll, options: _Options, d_options) -> jax.Array:
    """Tangent of the loss with respect to traced options (zero for Python floats)."""
    d_loss = jnp.zeros_like(rows.loss)
    if options.label_smoothing is not None and not _is_zero(d_options.label_smoothing):
        smooth = rows.smooth / jnp.maximum(rows.num_available, 1)
        d_loss = d_loss + (smooth - nll) * d_options.label_smoothing
    if options.z_loss is not None and not _is_zero(d_options.z_loss):
        d_loss = d_loss + jnp.square(_lse_or_zero(rows.lse)) * d_options.z_loss
    return d_loss


def _loss_coefficients(rows: _Rows, options: _Options, scale):
    """(a, b, c): d loss / dz = a p - b w_available - c t (t: target or one-hot, weighted).

    ``scale`` is the weight of the label term before smoothing (label weight or 1).
    """
    lse = _lse_or_zero(rows.lse)
    c = scale
    a = scale * rows.mass
    b = None
    if options.label_smoothing is not None:
        eps = options.label_smoothing
        b = eps / jnp.maximum(rows.num_available, 1)
        c = (1 - eps) * c
        a = (1 - eps) * a + b * rows.smooth_weight
    if options.z_loss is not None:
        a = a + 2 * options.z_loss * lse
    return a, b, c


def _class_weight_tangents(z, rows: _Rows, label_smoothing: jax.Array, dweights):
    """(d smooth, d smooth_weight, d loss) from a tangent of the class weights (smoothing on)."""
    available = z != -jnp.inf
    per_class = jnp.where(available, _lse_or_zero(rows.lse)[..., None] - z, 0)
    d_smooth = jnp.sum(per_class * dweights, axis=-1)
    d_weight = jnp.sum(jnp.where(available, dweights, 0), axis=-1)
    b = label_smoothing / jnp.maximum(rows.num_available, 1)
    return d_smooth, d_weight, b * d_smooth


def _available_weights(z, weights):
    return jnp.where(z != -jnp.inf, 1.0 if weights is None else weights, 0).astype(z.dtype)


# --------------------------------------------------------------------------------------------
# Integer labels.
# --------------------------------------------------------------------------------------------


def _statistics(hinted, one_pass, z, *rest):
    """Row statistics by ``one_pass`` where it pays off (GPU / TPU, 4-byte logits), else by
    ``hinted`` (the CPU formulation)."""
    return by_platform(hinted, one_pass if pays_off(z.dtype) else hinted, z, *rest)


def _label_logits(z: jax.Array, labels: jax.Array) -> jax.Array:
    """``z[..., label]`` in the compute dtype (gathered from an alias of a half input)."""
    z = _upcast_alias(z, _GATHER)
    return jnp.take_along_axis(z, labels[..., None], axis=-1)[..., 0]


def _integer_statistics_cpu(given, label_logits, weights, smoothing: bool):
    """(nll, lse, smooth, smooth_weight, num_available): hinted fast path, careful fallback."""
    # The careful branch upcasts for itself: a float32 copy passed into ``lax.cond`` would be
    # materialised in full.
    z = _upcast(given)
    hint = _finite_or_zero(label_logits)
    total, ok = _scaled_sum_exp(z, hint)
    offset = jnp.log(total)
    if smoothing:
        # A half-precision input is read again through an alias (see _centred_class_sum).
        smooth_parts, finite = _smoothing_fast(given, hint, offset, weights)
        ok = ok & finite

    def fast():
        # lse - z_y = offset + (hint - z_y): exactly ``offset`` when the hint is the label logit.
        # lse >= z_y, but the two rounded factors of ``total`` can put a confident example's
        # offset one ulp below 0 (a loss of -1.2e-7): the bound is taken (NaN passes through).
        nll = jnp.maximum(offset + (hint - label_logits), 0)
        return nll, offset + hint, *(smooth_parts if smoothing else _no_smoothing(nll))

    def careful():
        lse, nll, *smooth_parts = _careful_statistics(
            given, weights, smoothing, label_logits=label_logits
        )
        return nll, lse, *smooth_parts

    return fast_or_careful(jnp.all(ok), fast, careful)


@jax.custom_jvp
def _integer_rows(z, labels, label_weights, weights, kept, options: _Options) -> _Rows:
    """Per-row loss for integer labels; ``z`` may be half precision (upcast inside the passes).

    ``kept`` (``None``: every row) marks the rows that are not ``ignore_index``: the others get
    an exactly zero derivative, even where their logits are not finite.
    """
    smoothing = options.label_smoothing is not None
    label_logits = _label_logits(z, labels)
    nll, lse, smooth, smooth_weight, num_available = _statistics(
        functools.partial(_integer_statistics_cpu, smoothing=smoothing),
        functools.partial(_online.integer_statistics, smoothing=smoothing),
        z,
        label_logits,
        weights,
    )
    loss = _combine(nll, lse, smooth, num_available, label_weights, options)
    return _Rows(loss, lse, nll, smooth, smooth_weight, num_available, jnp.ones_like(nll))


def _integer_rows_jvp(primals, tangents):
    z, labels, label_weights, weights, kept, options = primals
    dz, _, d_label_weights, dweights, _, d_options = tangents
    rows = _integer_rows(z, labels, label_weights, weights, kept, options)
    z = _upcast_alias(z, _GRADIENT)
    zeros = jnp.zeros_like(rows.loss)
    scale = jnp.ones_like(zeros) if label_weights is None else label_weights
    d_loss = _option_tangents(rows, rows.nll * scale, options, d_options)
    d_lse, d_nll, d_smooth, d_weight = zeros, zeros, zeros, zeros
    if not _is_zero(dz):
        probs = jnp.exp(z - _lse_or_zero(rows.lse)[..., None])
        if kept is not None:
            # Double where: an ignored row's +inf or NaN logit must not reach its zero gradient.
            probs = jnp.where(kept[..., None], probs, 0)
        a, b, c = _loss_coefficients(rows, options, scale)
        coefficient = a[..., None] * probs
        if b is not None:
            available_weights = _available_weights(z, weights)
            coefficient = coefficient - b[..., None] * available_weights
            d_smooth = jnp.sum((rows.smooth_weight[..., None] * probs - available_weights) * dz, -1)
        d_lse = jnp.sum(probs * dz, axis=-1)
        if dz.dtype == z.dtype and z.dtype != jnp.float64:
            # Transposed by jax.grad, the gather becomes a scatter into the gradient in place:
            # cheaper than an iota comparison in the elementwise pass.
            picked = jnp.take_along_axis(dz, labels[..., None], axis=-1)[..., 0]
            d_loss = d_loss + jnp.sum(coefficient * dz, axis=-1) - c * picked
        else:
            iota = jax.lax.broadcasted_iota(labels.dtype, z.shape, z.ndim - 1)
            is_label = iota == labels[..., None]
            if z.dtype == jnp.float64:
                # The label's entry as a (p_y - 1) + (a - c) with p_y - 1 = -sum_{c != y} p_c:
                # summed without the label's own term, p_y - 1 near p_y = 1 is not rounded at
                # 1 (an empty row has p_y = 0).
                others = jnp.sum(jnp.where(is_label, 0, probs), axis=-1)
                p_y_minus_1 = jnp.where(rows.lse == -jnp.inf, -1, -others)
                label_term = a * p_y_minus_1 + (a - c)
                if b is not None:
                    label_term = label_term - b * jnp.sum(
                        jnp.where(is_label, available_weights, 0), axis=-1
                    )
                coefficient = jnp.where(is_label, label_term[..., None], coefficient)
            else:
                # A half-precision gradient subtracts the label term before rounding, in one
                # pass.
                coefficient = jnp.where(is_label, coefficient - c[..., None], coefficient)
            d_loss = d_loss + jnp.sum(coefficient * dz, axis=-1)
            picked = jnp.sum(jnp.where(is_label, dz, 0).astype(z.dtype), axis=-1)
        d_nll = d_lse - picked
    if label_weights is not None and not _is_zero(d_label_weights):
        c_nll = 1.0 if options.label_smoothing is None else 1 - options.label_smoothing
        d_loss = d_loss + c_nll * rows.nll * d_label_weights
    if options.label_smoothing is not None and weights is not None and not _is_zero(dweights):
        d_smooth_w, d_weight, d_loss_w = _class_weight_tangents(
            z, rows, options.label_smoothing, dweights
        )
        d_smooth, d_loss = d_smooth + d_smooth_w, d_loss + d_loss_w
    return rows, _Rows(d_loss, d_lse, d_nll, d_smooth, d_weight, zeros, zeros)


_integer_rows.defjvp(_integer_rows_jvp, symbolic_zeros=True)


# --------------------------------------------------------------------------------------------
# Dense labels.
# --------------------------------------------------------------------------------------------


def _dense_statistics_cpu(given_z, given_targets, weights, smoothing: bool):
    """(nll, lse, smooth, smooth_weight, num_available, mass): hinted fast path, careful
    fallback."""
    dtype = v.compute_dtype(given_z.dtype)
    # Three passes, each upcasting its own alias of a half-precision input (see _upcast_alias):
    # a shared upcast of the logits or the targets would be written out as a float32 copy.
    mass = jnp.sum(_upcast_alias(given_targets, _MASS, dtype), axis=-1)
    dot = jnp.sum(_upcast_alias(given_targets, _DOT, dtype) * _upcast_alias(given_z, _DOT), -1)
    z = _upcast(given_z)
    # The target-weighted mean logit: sum_c t_c (z_c - hint) = 0, so nll = mass * offset.
    hint = _finite_or_zero(jnp.where(mass > 0, dot / jnp.where(mass > 0, mass, 1), 0))
    total, ok = _scaled_sum_exp(z, hint)
    offset = jnp.log(total)
    # A zero target on a -inf logit makes ``dot`` NaN: the careful path gives it no weight.
    ok = ok & jnp.isfinite(dot) & jnp.isfinite(mass)
    if smoothing:
        # A half-precision input is read again through an alias (see _centred_class_sum).
        smooth_parts, finite = _smoothing_fast(given_z, hint, offset, weights)
        ok = ok & finite

    def fast():
        # offset = lse - hint >= 0 for non-negative targets, but the two rounded factors of
        # ``total`` can put a confident row one ulp below 0 (a loss of -1.2e-7). Only that
        # rounding band is lifted: negative targets can make a loss genuinely negative.
        rounding = (offset < 0) & (offset > -4 * jnp.finfo(offset.dtype).eps)
        nll = mass * jnp.where(rounding, 0, offset) + (mass * hint - dot)
        return nll, offset + hint, *(smooth_parts if smoothing else _no_smoothing(nll))

    def careful():
        # The careful branch upcasts for itself (see _integer_statistics_cpu).
        # 0 * log 0 = 0: a class without target mass never contributes, even at a -inf logit.
        lse, nll, *smooth_parts = _careful_statistics(
            given_z, weights, smoothing, given_targets, mass
        )
        return nll, lse, *smooth_parts

    return (*fast_or_careful(jnp.all(ok), fast, careful), mass)


@jax.custom_jvp
def _dense_rows(z, targets, weights, options: _Options) -> _Rows:
    """Per-row loss for dense targets (class weights already applied to them)."""
    smoothing = options.label_smoothing is not None
    nll, lse, smooth, smooth_weight, num_available, mass = _statistics(
        functools.partial(_dense_statistics_cpu, smoothing=smoothing),
        functools.partial(_online.dense_statistics, smoothing=smoothing),
        z,
        targets,
        weights,
    )
    loss = _combine(nll, lse, smooth, num_available, None, options)
    return _Rows(loss, lse, nll, smooth, smooth_weight, num_available, mass)


def _dense_rows_jvp(primals, tangents):
    z, targets, weights, options = primals
    dz, dtargets, dweights, d_options = tangents
    rows = _dense_rows(z, targets, weights, options)
    z, targets = _upcast_alias(z, _GRADIENT), _upcast_alias(targets, _GRADIENT)
    zeros = jnp.zeros_like(rows.loss)
    d_loss = _option_tangents(rows, rows.nll, options, d_options)
    d_lse, d_nll, d_smooth, d_weight, d_mass = zeros, zeros, zeros, zeros, zeros
    c_nll = 1.0 if options.label_smoothing is None else 1 - options.label_smoothing
    if not _is_zero(dz):
        probs = jnp.exp(z - _lse_or_zero(rows.lse)[..., None])
        a, b, c = _loss_coefficients(rows, options, jnp.ones_like(zeros))
        coefficient = a[..., None] * probs - c[..., None] * targets
        if b is not None:
            available_weights = _available_weights(z, weights)
            coefficient = coefficient - b[..., None] * available_weights
            d_smooth = jnp.sum((rows.smooth_weight[..., None] * probs - available_weights) * dz, -1)
        d_loss = d_loss + jnp.sum(coefficient * dz, axis=-1)
        d_lse = jnp.sum(probs * dz, axis=-1)
        d_nll = jnp.sum((rows.mass[..., None] * probs - targets) * dz, axis=-1)
    if not _is_zero(dtargets):
        lse = _lse_or_zero(rows.lse)
        # d/dt_c = lse - z_c (+inf for mass on a -inf logit); 0 for a zero target at -inf.
        coefficient = jnp.where((targets == 0) & (z == -jnp.inf), 0, lse[..., None] - z)
        d_nll_t = jnp.sum(coefficient * dtargets, axis=-1)
        d_nll = d_nll + d_nll_t
        d_loss = d_loss + c_nll * d_nll_t
        d_mass = jnp.sum(dtargets, axis=-1).astype(zeros.dtype)  # half-precision targets
    if options.label_smoothing is not None and weights is not None and not _is_zero(dweights):
        d_smooth_w, d_weight, d_loss_w = _class_weight_tangents(
            z, rows, options.label_smoothing, dweights
        )
        d_smooth, d_loss = d_smooth + d_smooth_w, d_loss + d_loss_w
    return rows, _Rows(d_loss, d_lse, d_nll, d_smooth, d_weight, zeros, d_mass)


_dense_rows.defjvp(_dense_rows_jvp, symbolic_zeros=True)


def _row_options(options: SoftmaxOptions) -> _Options:
    return _Options(options.label_smoothing, options.z_loss)


def _prepare(logits: jax.Array, axis: int, where, logit_softcap):
    """(logits with the class axis last, example mask, class mask in that layout or None).

    Without a mask, a soft cap or a transpose the caller's array is returned as it is, even in
    half precision: the statistics upcast it inside their fused passes, which saves writing and
    re-reading a float32 copy.
    """
    if where is None and logit_softcap is None and axis == logits.ndim - 1:
        return logits, None, None
    prepared = prepare_logits(logits, axis=axis, where=where, logit_softcap=logit_softcap)
    return prepared.logits, prepared.example_mask, prepared.class_mask


def _tempered(logits: jax.Array, options: SoftmaxOptions) -> jax.Array:
    """``logits / T`` in the compute dtype (the cap is scaled with them: ``scaled_softcap``)."""
    if options.scale is None:
        return logits
    return logits.astype(v.compute_dtype(logits.dtype)) * options.scale


def _validity(example_mask: jax.Array | None, row_valid: jax.Array) -> jax.Array:
    return row_valid if example_mask is None else example_mask & row_valid


def dense_loss(
    logits: jax.Array, targets: jax.Array, *, axis: int, where, options: SoftmaxOptions
) -> jax.Array:
    """The dense-label loss on checked inputs (``axis`` an int; ``options`` validated)."""
    logits = _tempered(logits, options)
    z, example_mask, class_mask = _prepare(logits, axis, where, options.scaled_softcap)
    if axis != targets.ndim - 1:
        targets = jnp.moveaxis(targets, axis, -1)
    if class_mask is not None:
        # A masked class leaves the softmax and the target sum alike (optax's convention).
        targets = jnp.where(class_mask, targets, 0)
    weights = options.class_weights
    if weights is not None:
        targets = targets.astype(weights.dtype) * weights

    rows = _dense_rows(z, targets, weights, _row_options(options))
    valid = _validity(example_mask, rows.lse != -jnp.inf)
    loss = jnp.where(valid, rows.loss, 0)
    return reduce_loss(loss, options.reduction, denominator_weights=valid)


def integer_loss(
    logits: jax.Array, labels: ArrayLike, *, axis: int, where, options: SoftmaxOptions
) -> jax.Array:
    """The integer-label loss on one device, on checked inputs."""
    logits = _tempered(logits, options)
    z, example_mask, _ = _prepare(logits, axis, where, options.scaled_softcap)
    num_classes = z.shape[-1]
    weights = options.class_weights
    integer_labels = prepare_integer_labels(
        labels, batch_shape=z.shape[:-1], num_classes=num_classes, ignore_index=options.ignore_index
    )
    safe_labels = integer_labels.safe
    label_weights = None if weights is None else weights[safe_labels]

    rows = _integer_rows(
        z, safe_labels, label_weights, weights, integer_labels.kept, _row_options(options)
    )
    valid = combine_masks(example_mask, rows.lse != -jnp.inf, integer_labels.kept)
    # Loud, never silently wrong: an invalid label (not ignored) makes its example NaN.
    loss = jnp.where(integer_labels.invalid, jnp.nan, rows.loss)
    loss = jnp.where(valid, loss, 0)
    denominator = valid if label_weights is None else jnp.where(valid, label_weights, 0)
    return reduce_loss(loss, options.reduction, denominator_weights=denominator)


def softmax_cross_entropy(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    axis: int | tuple[int, ...] = -1,
    where: ArrayLike | None = None,
    label_smoothing: float = 0.0,
    class_weights: ArrayLike | None = None,
    z_loss: float = 0.0,
    logit_softcap: float | None = None,
    temperature: float = 1.0,
    reduction: v.Reduction = "none",
) -> jax.Array:
    r"""Softmax cross-entropy between logits and dense (one-hot or soft) labels.

    .. math::
        \ell = -\sum_c w_c\, t_c \log \operatorname{softmax}(z)_c
               + \lambda_z \big(\log \textstyle\sum_c e^{z_c}\big)^2,
        \qquad t = (1 - \varepsilon)\, y + \varepsilon / K

    where :math:`z` are the (optionally soft-capped) logits, :math:`K` counts the classes that
    are neither masked by ``where`` nor at ``-inf`` in that row, and :math:`w` are
    ``class_weights``. A class with zero target mass contributes exactly 0, even when its logit
    is ``-inf``; positive mass on a ``-inf`` logit costs ``+inf``.

    Args:
      logits: ``[..., K, ...]`` unnormalised scores, class axis ``axis``. float16 / bfloat16
        are computed in float32.
      labels: same shape as ``logits``: a distribution over classes per example (rows need not
        be normalised; no renormalisation is done).
      axis: the class axis (PyTorch's layout ``[N, K, ...]`` is ``axis=1``).
      where: boolean mask. With the logits' rank it masks classes (they leave the softmax and
        receive no smoothing mass); with a lower rank it broadcasts to the batch shape and masks
        whole examples (loss 0, gradient 0, left out of the mean).
      label_smoothing: :math:`\varepsilon \in [0, 1)`.
      class_weights: ``[K]`` weight per class (PyTorch ``weight`` for probability targets).
      z_loss: coefficient of the squared log-normaliser (PaLM's z-loss).
      logit_softcap: if set to :math:`s > 0`, logits become :math:`s \tanh(z / s)` first.
      temperature: :math:`T > 0`: the softmax sees the (soft-capped) logits divided by
        :math:`T` (distillation, sampling-aware RL losses); 1 leaves them as they are.
      reduction: ``"none"`` (per example, shape of ``logits`` without ``axis``), ``"sum"``, or
        ``"mean"`` over valid examples (0.0 when there are none).

    Returns:
      The loss in float32 (float64 for float64 logits).

    Examples:
      >>> import jax.numpy as jnp
      >>> import xent_jax
      >>> logits = jnp.array([[2.0, 1.0, 0.1]])
      >>> labels = jnp.array([[1.0, 0.0, 0.0]])
      >>> xent_jax.softmax_cross_entropy(logits, labels)
      Array([0.41703], dtype=float32)
    """
    logits = v.as_logits(logits)
    targets = v.as_float_array("labels", labels)
    v.check_same_shape("logits", logits, "labels", targets)
    axis = v.normalize_class_axes(axis, logits.ndim)
    if isinstance(axis, tuple):
        logits, where, targets = collapse_class_axes(logits, axis, where, targets)
        axis = logits.ndim - 1
    options = softmax_options(
        num_classes=logits.shape[axis],
        dtype=v.compute_dtype(logits.dtype),
        reduction=reduction,
        label_smoothing=label_smoothing,
        class_weights=class_weights,
        z_loss=z_loss,
        logit_softcap=logit_softcap,
        temperature=temperature,
    )
    return dense_loss(logits, targets, axis=axis, where=where, options=options)


def softmax_cross_entropy_with_integer_labels(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    axis: int | tuple[int, ...] = -1,
    where: ArrayLike | None = None,
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    class_weights: ArrayLike | None = None,
    z_loss: float = 0.0,
    logit_softcap: float | None = None,
    temperature: float = 1.0,
    reduction: v.Reduction = "none",
) -> jax.Array:
    r"""Softmax cross-entropy with integer class labels; never builds a one-hot.

    .. math::
        \ell = (1 - \varepsilon)\, w_y \big(\operatorname{lse}(z) - z_y\big)
               + \frac{\varepsilon}{K} \sum_c w_c \big(\operatorname{lse}(z) - z_c\big)
               + \lambda_z \operatorname{lse}(z)^2

    This is ``torch.nn.functional.cross_entropy`` with ``weight``, ``ignore_index`` and
    ``label_smoothing``: with ``reduction="mean"`` the sum is divided by the summed
    :math:`w_y` of the valid examples (0.0 when there are none, where PyTorch gives NaN).

    Labels outside ``[0, K)`` that are not ``ignore_index`` give NaN for that example (optax
    silently wraps ``-1`` to the last class). For a hard error instead, see
    :func:`xent_jax.validate_integer_labels` and :func:`xent_jax.checked`.

    Args:
      logits: ``[..., K, ...]`` unnormalised scores with the class axis at ``axis``; float16 /
        bfloat16 are computed in float32.
      labels: integer class indices with the shape of ``logits`` without ``axis``.
      axis: the class axis (PyTorch's ``[N, K, d1, ...]`` layout is ``axis=1``).
      where: boolean mask; with the logits' rank it masks classes, with a lower rank it masks
        examples (loss 0, gradient 0, left out of the mean).
      ignore_index: a label value that marks an example to ignore (like a ``where`` of False).
      label_smoothing: :math:`\varepsilon \in [0, 1)`, spread over the :math:`K` classes that are
        neither masked nor at ``-inf``.
      class_weights: ``[K]`` weight per class.
      z_loss: coefficient of the squared log-normaliser.
      logit_softcap: if set to :math:`s > 0`, logits become :math:`s \tanh(z / s)` first.
      temperature: :math:`T > 0`: the softmax sees the (soft-capped) logits divided by
        :math:`T` (distillation, sampling-aware RL losses); 1 leaves them as they are.
      reduction: ``"none"`` (shape of ``labels``), ``"sum"`` or ``"mean"``.

    Returns:
      The loss in float32 (float64 for float64 logits).

    Examples:
      >>> import jax.numpy as jnp
      >>> import xent_jax
      >>> logits = jnp.array([[2.0, 1.0, 0.1], [0.5, 2.5, 0.0]])
      >>> xent_jax.softmax_cross_entropy_with_integer_labels(logits, jnp.array([0, 1]))
      Array([0.41703..., 0.19673...], dtype=float32)
      >>> xent_jax.softmax_cross_entropy_with_integer_labels(
      ...     logits, jnp.array([0, -100]), ignore_index=-100, reduction="mean")
      Array(0.41703, dtype=float32)
    """
    logits = v.as_logits(logits)
    labels = v.as_integer_labels(labels)
    axis = v.normalize_class_axes(axis, logits.ndim)
    if isinstance(axis, tuple):
        logits, where, _ = collapse_class_axes(logits, axis, where)
        axis = logits.ndim - 1
    options = softmax_options(
        num_classes=logits.shape[axis],
        dtype=v.compute_dtype(logits.dtype),
        reduction=reduction,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        class_weights=class_weights,
        z_loss=z_loss,
        logit_softcap=logit_softcap,
        temperature=temperature,
    )
    if _mesh.is_explicitly_sharded(logits):
        # Logits laid out over an explicit mesh: each device reduces its own block (shard_map),
        # so nothing of the logits' size is ever gathered.
        return vocab_parallel_integer_loss(logits, labels, axis=axis, where=where, options=options)
    return integer_loss(logits, labels, axis=axis, where=where, options=options)
