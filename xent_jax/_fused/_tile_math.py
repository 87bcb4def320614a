"""Per-tile arithmetic: logits of one ``[tokens, classes]`` tile, the online logsumexp
statistics it updates, the per-token loss and VJP coefficients derived from the final
statistics, and the gradient of the tile's logits.

Every function here sees one tile (or the final per-token statistics); the loops over blocks
and tiles are in :mod:`xent_jax._fused._passes`; :mod:`xent_jax._fused._vocab_parallel` reuses
them on logits that are already materialised (one tile per device).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from xent_jax._fused._blocks import Plan, take_block


class BlockedInputs(NamedTuple):
    """Local arrays in block/tile layout (``None`` where an option is off)."""

    x4: jax.Array | None  # [pn, kn, bc, D] (None from prepare_rows: logits given, no x)
    w4: jax.Array | None  # [D, pv, kv, tc] (None from prepare_rows)
    labels: jax.Array  # [kn, bn] int32, clipped into [0, V_global)
    keep: jax.Array  # [kn, bn] bool: not masked by where, not ignored, in the padding
    invalid: jax.Array  # [kn, bn] bool: label out of range (and not ignored/masked)
    wy: jax.Array | None  # [kn, bn] class weight of the label
    cls: jax.Array  # [kv, bv] int32 global class of each tile column (-1 in the padding)
    bias: jax.Array | None  # [kv, bv]
    cw: jax.Array | None  # [kv, bv]
    cmask: jax.Array | None  # shared: [kv, 1, bv]; rows: [kn, kv, bn, bv]; padding: [kv, 1, bv]
    eps: jax.Array | None  # label smoothing (scalar, compute dtype)
    z_loss: jax.Array | None  # z-loss coefficient (scalar, compute dtype)
    tw: jax.Array | None = None  # [kn, bn] per-token weights (float ``where``)


class Stats(NamedTuple):
    """Running per-token statistics (each ``[kn, bn]``; unused fields are dummies)."""

    m: jax.Array  # running max of the available logits
    s: jax.Array  # sum of exp(z - shift(m))
    zy: jax.Array  # label logit
    k: jax.Array  # number of available classes (smoothing only)
    sw: jax.Array  # sum of class weights of available classes (smoothing only)
    swz: jax.Array  # sum of w_c (z_c - shift(m)) over available classes (smoothing only)
    best: jax.Array  # max logit (argmax only)
    arg: jax.Array  # global class of the max logit (argmax only)
    ez: jax.Array  # sum of exp(z - shift(m)) (z - shift(m)) over available classes (aux only)


class _Rows(NamedTuple):
    """Per-token results derived from the final statistics (``[kn, bn]`` each)."""

    loss: jax.Array
    lse: jax.Array
    valid: jax.Array  # counts in the loss (and the mean's denominator)
    grad_ok: jax.Array  # receives a gradient (valid and the label is in range)
    prob_coef: jax.Array  # coefficient of p_c in dL/dz_c (per unit cotangent)
    label_coef: jax.Array  # coefficient of the label one-hot
    smooth_coef: jax.Array  # coefficient of w_c (smoothing)
    entropy: jax.Array  # entropy of the softmax (aux only; 0 otherwise)
    label_logprob: jax.Array  # log p_y (aux only; 0 otherwise)


def _shift(m: jax.Array) -> jax.Array:
    """The value logits are shifted by before ``exp``: the running max, or 0 where it is -inf."""
    # A row with no available class keeps z - shift = -inf (exp 0) instead of -inf - -inf = NaN.
    return jnp.where(m == -jnp.inf, 0, m)


def tile_mask(plan: Plan, inputs: BlockedInputs, i, j) -> jax.Array | None:
    """Boolean ``[bn or 1, bv]`` of classes that exist and are not masked; ``None``: all."""
    if inputs.cmask is None:
        return None
    if plan.cmask == "rows":
        block = take_block(inputs.cmask, i, plan.kn == 1)
        return take_block(block, j, plan.kv == 1)
    return take_block(inputs.cmask, j, plan.kv == 1)


def tile_logits(plan: Plan, inputs: BlockedInputs, x_i: jax.Array, w_j: jax.Array, j, mask):
    """Returns (capped logits, masked capped logits) of one ``[bn, bv]`` tile."""
    # Accumulate in the compute dtype: bfloat16 / float16 products would lose the small terms.
    raw_logits = jnp.dot(x_i, w_j, preferred_element_type=plan.cdtype, precision=plan.precision)
    return transform_logits(plan, inputs, raw_logits, j, mask)


def transform_logits(plan: Plan, inputs: BlockedInputs, raw_logits: jax.Array, j, mask):
    """Bias, soft cap and mask applied to raw logits: (capped, masked capped)."""
    logits = raw_logits
    if inputs.bias is not None:
        logits = logits + take_block(inputs.bias, j, plan.kv == 1).astype(plan.cdtype)[None, :]
    if plan.scale is not None:
        logits = logits * plan.scale  # a temperature: the cap in the plan is scaled alike
    if plan.softcap is not None:
        cap = plan.softcap
        # A class masked by a -inf bias stays -inf (tanh would turn it into an available -cap).
        logits = jnp.where(logits == -jnp.inf, logits, cap * jnp.tanh(logits / cap))
    masked = logits if mask is None else jnp.where(mask, logits, -jnp.inf)
    return logits, masked


def init_stats(plan: Plan) -> Stats:
    """Statistics before any tile: max and best logit -inf, sums and counts 0."""
    shape = (plan.kn, plan.bn)
    zeros = functools.partial(jnp.zeros, shape, plan.cdtype)
    return Stats(
        m=jnp.full(shape, -jnp.inf, plan.cdtype),
        s=zeros(),
        zy=zeros(),
        k=zeros(),
        sw=zeros(),
        swz=zeros(),
        best=jnp.full(shape, -jnp.inf, plan.cdtype),
        arg=jnp.zeros(shape, jnp.int32),
        ez=zeros(),
    )


def update_stats(
    plan: Plan, stats: tuple, masked_logits: jax.Array, labels, tile_classes, tile_class_weights
) -> tuple:
    """Folds one tile into the running statistics of its rows (tuples of ``[bn]``)."""
    m, s, zy, k, sw, swz, best, arg, ez = stats
    m_new = jnp.maximum(m, jnp.max(masked_logits, axis=-1))
    shift = _shift(m_new)
    shifted = masked_logits - shift[:, None]
    exps = jnp.exp(shifted)
    rescale = jnp.exp(m - shift)
    if plan.aux:
        # sum exp(z - s) (z - s) moved from the old shift to the new one, then this tile's terms
        # (-inf logits contribute 0, not 0 * -inf).
        ez = rescale * (ez + (_shift(m) - shift) * s)
        ez = ez + jnp.sum(jnp.where(masked_logits == -jnp.inf, 0, exps * shifted), axis=-1)
    # Online logsumexp: rescale the old sum to the new max, so no exp ever exceeds 1.
    s = s * rescale + jnp.sum(exps, axis=-1)
    is_label = tile_classes[None, :] == labels[:, None]
    zy = zy + jnp.sum(jnp.where(is_label, masked_logits, 0), axis=-1)
    if plan.smoothing:
        avail = masked_logits != -jnp.inf
        k = k + jnp.sum(avail, axis=-1, dtype=plan.cdtype)
        # Re-reference the running sum of w_c (z_c - shift) to the new shift (skipped while the
        # old max is -inf: sw is 0 there and 0 * -inf would be NaN).
        swz = swz + jnp.where(m == -jnp.inf, 0, sw * (m - shift))
        if tile_class_weights is None:
            sw = sw + jnp.sum(avail, axis=-1, dtype=plan.cdtype)
            swz = swz + jnp.sum(jnp.where(avail, shifted, 0), axis=-1)
        else:
            weights = tile_class_weights[None, :]
            sw = sw + jnp.sum(jnp.where(avail, weights, 0), axis=-1)
            swz = swz + jnp.sum(jnp.where(avail, weights * shifted, 0), axis=-1)
    if plan.aux:
        tile_best = jnp.max(masked_logits, axis=-1)
        tile_arg = tile_classes[jnp.argmax(masked_logits, axis=-1)]
        better = tile_best > best
        best = jnp.where(better, tile_best, best)
        arg = jnp.where(better, tile_arg, arg)
    return m_new, s, zy, k, sw, swz, best, arg, ez


def combine_stats(plan: Plan, stats: Stats) -> Stats:
    """Combines the statistics of the vocabulary shards (pmax / psum over ``vocab_axes``)."""
    axes = plan.vocab_axes
    if not axes:
        return stats
    m_global = lax.pmax(stats.m, axes)
    shift_global = _shift(m_global)
    # Rescale each shard's sum to the global max before adding (no exp exceeds 1).
    rescale = jnp.exp(stats.m - shift_global)
    s = stats.s * rescale
    ez = stats.ez
    if plan.aux:
        ez = rescale * (ez + (_shift(stats.m) - shift_global) * stats.s)
    zy = stats.zy
    k, sw, swz = stats.k, stats.sw, stats.swz
    if plan.smoothing:
        # Re-reference to the global shift; a shard whose max is -inf has sw = 0 (no NaN).
        swz = swz + jnp.where(stats.m == -jnp.inf, 0, sw * (_shift(stats.m) - shift_global))
    s, zy, k, sw, swz, ez = lax.psum((s, zy, k, sw, swz, ez), axes)
    best, arg = stats.best, stats.arg
    if plan.aux:
        best_global = lax.pmax(best, axes)
        # The smallest class among the shards that hold the max: the first one on ties.
        arg = lax.pmin(jnp.where(best == best_global, arg, jnp.iinfo(jnp.int32).max), axes)
        best = best_global
    return Stats(m_global, s, zy, k, sw, swz, best, arg, ez)


def finish_rows(plan: Plan, inputs: BlockedInputs, stats: Stats) -> _Rows:
    """Per-token loss, logsumexp, validity and VJP coefficients from the final statistics."""
    row_ok = stats.m != -jnp.inf
    # log(1) on rows without an available class keeps log(0) and its NaN gradient out.
    lse = jnp.where(row_ok, _shift(stats.m) + jnp.log(jnp.where(row_ok, stats.s, 1)), 0)
    one_minus = 1.0
    if plan.smoothing:
        # The plan's switches and the inputs come from the same options: on means present.
        assert inputs.eps is not None
        one_minus = 1.0 - inputs.eps
    wy = inputs.wy if inputs.wy is not None else 1.0
    # lse - z_y as (max - z_y) + log(sum): the large terms cancel first, exactly (lse - z_y keeps
    # only lse's ulp: 7.6e-6 for a true 8.4e-6 at logits [90, 78, 77]).
    log_sum = jnp.log(jnp.where(row_ok, stats.s, 1))
    nll = jnp.where(row_ok, (_shift(stats.m) - stats.zy) + log_sum, lse - stats.zy)
    entropy = label_logprob = jnp.zeros_like(lse)
    if plan.aux:
        # H = lse - E_p[z] = log S - (sum exp(z - s)(z - s)) / S, both relative to the shift.
        entropy = jnp.where(row_ok, log_sum - stats.ez / jnp.where(row_ok, stats.s, 1), 0)
        label_logprob = -nll
    if inputs.wy is not None:
        nll = nll * inputs.wy
    loss = nll
    prob_coef = jnp.ones_like(lse) * wy * one_minus
    label_coef = prob_coef
    smooth_coef = jnp.zeros_like(lse)
    if plan.smoothing:
        assert inputs.eps is not None  # (as above)
        # At least 1 available class in the denominator: rows with none would divide by 0.
        k = jnp.maximum(stats.k, 1)
        smooth = (stats.sw * (lse - _shift(stats.m)) - stats.swz) / k
        loss = one_minus * nll + inputs.eps * smooth
        smooth_coef = inputs.eps / k
        prob_coef = prob_coef + smooth_coef * stats.sw
    if plan.has_z_loss:
        assert inputs.z_loss is not None  # (as above)
        loss = loss + inputs.z_loss * jnp.square(lse)
        prob_coef = prob_coef + 2.0 * inputs.z_loss * lse
    valid = inputs.keep & row_ok
    if inputs.tw is not None:
        # Per-token weights scale the loss and every coefficient of its gradient alike.
        loss, prob_coef = loss * inputs.tw, prob_coef * inputs.tw
        label_coef, smooth_coef = label_coef * inputs.tw, smooth_coef * inputs.tw
    loss = jnp.where(inputs.invalid, jnp.nan, loss)
    loss = jnp.where(valid, loss, 0)
    grad_ok = valid & ~inputs.invalid
    label_logprob = jnp.where(inputs.invalid, jnp.nan, jnp.where(valid, label_logprob, 0))
    entropy = jnp.where(inputs.keep, entropy, 0)
    return _Rows(
        loss, lse, valid, grad_ok, prob_coef, label_coef, smooth_coef, entropy, label_logprob
    )


def grad_coefficients(rows: _Rows) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The three VJP coefficients of ``rows``, zero for tokens that receive no gradient."""
    ok = rows.grad_ok
    return (
        jnp.where(ok, rows.prob_coef, 0),
        jnp.where(ok, rows.label_coef, 0),
        jnp.where(ok, rows.smooth_coef, 0),
    )


def tile_grad(
    plan: Plan,
    logits,
    masked_logits,
    mask,
    lse,
    prob_coef,
    label_coef,
    smooth_coef,
    labels,
    tile_classes,
    tile_class_weights,
) -> jax.Array:
    """dL/du of one tile for per-row coefficients (cotangent already folded into them)."""
    p = jnp.exp(masked_logits - lse[:, None])
    is_label = tile_classes[None, :] == labels[:, None]
    du = prob_coef[:, None] * p - jnp.where(is_label, label_coef[:, None], 0)
    if plan.smoothing:
        wc = 1.0 if tile_class_weights is None else tile_class_weights[None, :]
        du = du - jnp.where(masked_logits != -jnp.inf, smooth_coef[:, None] * wc, 0)
    elif mask is not None:
        du = jnp.where(mask, du, 0)
    if plan.softcap is not None:
        # d(cap tanh(u / cap))/du = 1 - (capped / cap)^2, from the masked logits: a class masked
        # by a -inf bias or by `where` (even over a NaN) passes through (derivative 1, du = 0)
        # where the formula would give 0 * -inf or 0 * NaN = NaN.
        dcap = 1.0 - jnp.square(masked_logits / plan.softcap)
        du = du * jnp.where(masked_logits == -jnp.inf, 1.0, dcap)
    if plan.scale is not None:
        du = du * plan.scale  # the derivative of the temperature's scaling
    # Rows without a gradient stay exactly 0, even where their logits are NaN or inf.
    live = (prob_coef != 0) | (label_coef != 0) | (smooth_coef != 0)
    return jnp.where(live[:, None], du, 0)
