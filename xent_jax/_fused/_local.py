"""Per-device entry points: what runs on one device's share of the tokens and classes (inside
``shard_map`` on a mesh). Each one lays its arrays out in blocks and tiles, runs a pass from
:mod:`xent_jax._fused._passes`, and combines the results over the mesh axes it is split over."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Generic, NamedTuple, TypeVar

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

from xent_jax._fused._blocks import (
    Plan,
    bias_unview,
    blocks_to_rows,
    cols_to_tiles,
    rows_to_blocks,
    w_unview,
    w_view,
    x_unview,
    x_view,
)
from xent_jax._fused._passes import grad_pass, stats_pass, strip_pass
from xent_jax._fused._tile_math import BlockedInputs, finish_rows, grad_coefficients
from xent_jax._labels import comparable_labels
from xent_jax._options import SoftmaxOptions


@dataclasses.dataclass(frozen=True)
class Call:
    """Static description of one call: the local plan plus how it is laid out on a mesh."""

    plan: Plan
    reduction: str
    mesh: Any = None  # shard_map over this mesh when not None
    batch_spec: tuple = ()  # PartitionSpec entries of the batch dims
    data_axes: tuple[str, ...] = ()
    vocab_axes: tuple[str, ...] = ()


# The leaves of NonDiffInputs: jax.Array for the inputs, PartitionSpec for their shard_map specs.
_Leaf = TypeVar("_Leaf")


class NonDiffInputs(NamedTuple, Generic[_Leaf]):
    """The inputs that get no gradient (one argument of the custom VJPs); with ``PartitionSpec``
    leaves, their specs (``partition_specs``: the same pytree structure)."""

    labels: _Leaf  # batch shape, integer
    example_mask: _Leaf | None  # batch shape, bool
    class_weights: _Leaf | None  # [V]
    class_mask: _Leaf | None  # [1, V] or batch shape + [V]
    label_smoothing: _Leaf | None  # scalar (None: off)
    z_loss: _Leaf | None  # scalar (None: off)
    token_weights: _Leaf | None = None  # batch shape, float (a float ``where``)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _constant(name: str, value: jax.Array) -> jax.Array:
    return value


@functools.partial(_constant.defjvp, symbolic_zeros=True)
def _constant_jvp(name, primals, tangents):
    if not isinstance(tangents[0], SymbolicZero):
        # The blocked losses' custom VJPs give their constant inputs no gradient: refuse to
        # differentiate through them rather than return a silent zero.
        raise TypeError(
            f"the fused and vocab-parallel losses give no derivative with respect to {name}; "
            "differentiate softmax_cross_entropy_with_integer_labels on unsharded logits "
            "(x @ w) for it."
        )
    return primals[0], tangents[0]


def nondiff_inputs(
    labels, example_mask, class_mask, options: SoftmaxOptions, token_weights=None
) -> NonDiffInputs:
    """The inputs that receive no gradient; options a caller might differentiate raise if
    they do (see ``_constant``)."""
    guard = lambda name, value: None if value is None else _constant(name, value)
    return NonDiffInputs(
        labels=labels,
        example_mask=example_mask,
        class_weights=guard("class_weights", options.class_weights),
        class_mask=class_mask,
        label_smoothing=guard("label_smoothing", options.label_smoothing),
        z_loss=guard("z_loss", options.z_loss),
        token_weights=guard("where (token weights)", token_weights),
    )


def _vocab_offset(call: Call, v_local: int):
    """Global index of this device's first class (0 unless the classes are split)."""
    if not call.vocab_axes:
        return 0
    return lax.axis_index(call.vocab_axes) * v_local


def _prepare(call: Call, x, w, bias, nondiff: NonDiffInputs) -> BlockedInputs:
    """All local inputs in block / tile layout."""
    plan = call.plan
    inputs = prepare_rows(call, nondiff, bias)
    x4 = x_view(plan, x.reshape(plan.n, x.shape[-1]))
    return inputs._replace(x4=x4, w4=w_view(plan, w))


def prepare_rows(call: Call, nondiff: NonDiffInputs, bias) -> BlockedInputs:
    """Everything but ``x`` and ``w`` in block / tile layout (``x4`` and ``w4`` are ``None``)."""
    plan = call.plan
    n = plan.n
    offset = _vocab_offset(call, plan.v)
    labels = comparable_labels(nondiff.labels.reshape(n))
    example_mask = nondiff.example_mask
    keep = jnp.ones((n,), jnp.bool_) if example_mask is None else example_mask.reshape(n)
    invalid = (labels < 0) | (labels >= plan.v_global)
    if plan.ignore_index is not None:
        kept = labels != plan.ignore_index
        keep = keep & kept
        invalid = invalid & kept
    safe = jnp.clip(labels, 0, plan.v_global - 1).astype(jnp.int32)
    wy = None
    if nondiff.class_weights is not None:
        cw = nondiff.class_weights
        local = safe - offset
        owned = (local >= 0) & (local < plan.v)
        wy = jnp.where(owned, cw.astype(plan.cdtype)[jnp.clip(local, 0, plan.v - 1)], 0)
        if call.vocab_axes:
            wy = lax.psum(wy, call.vocab_axes)
    cls = jnp.arange(plan.v, dtype=jnp.int32) + offset
    cmask = None
    if nondiff.class_mask is not None:
        if plan.cmask == "rows":
            blocked = rows_to_blocks(plan, nondiff.class_mask.reshape(n, plan.v), False)
            cmask = jnp.swapaxes(cols_to_tiles(plan, blocked, False), 0, 1)
        else:
            cmask = cols_to_tiles(plan, nondiff.class_mask.reshape(1, plan.v), False)
    elif plan.cmask == "shared":  # padding only
        cmask = cols_to_tiles(plan, jnp.ones((1, plan.v), jnp.bool_), False)
    class_weights = nondiff.class_weights
    return BlockedInputs(
        x4=None,
        w4=None,
        labels=rows_to_blocks(plan, safe, 0),
        keep=rows_to_blocks(plan, keep, False),
        invalid=rows_to_blocks(plan, invalid, False),
        wy=None if wy is None else rows_to_blocks(plan, wy, 0),
        cls=cols_to_tiles(plan, cls, -1),
        bias=None if bias is None else cols_to_tiles(plan, bias, 0),
        cw=None if class_weights is None else cols_to_tiles(plan, class_weights, 0),
        cmask=cmask,
        eps=None
        if nondiff.label_smoothing is None
        else nondiff.label_smoothing.astype(plan.cdtype),
        z_loss=None if nondiff.z_loss is None else nondiff.z_loss.astype(plan.cdtype),
        tw=None
        if nondiff.token_weights is None
        else rows_to_blocks(plan, nondiff.token_weights.reshape(n).astype(plan.cdtype), 0),
    )


def mean_weights(plan: Plan, inputs: BlockedInputs, valid: jax.Array) -> jax.Array:
    """Weight of each token in the mean's denominator: its label's class weight, or 1, times
    its token weight."""
    weights = valid.astype(plan.cdtype) if inputs.wy is None else jnp.where(valid, inputs.wy, 0)
    return weights if inputs.tw is None else weights * inputs.tw


def local_forward(call: Call, x, w, bias, nondiff: NonDiffInputs):
    """Stats pass: per-token loss, lse, argmax, validity, mean weights and VJP coefficients."""
    plan = call.plan
    batch = x.shape[:-1]
    inputs = _prepare(call, x, w, bias, nondiff)
    stats = stats_pass(plan, inputs)
    rows = finish_rows(plan, inputs, stats)
    denw = mean_weights(plan, inputs, rows.valid)
    out = (
        rows.loss,
        rows.lse,
        stats.arg,
        rows.valid,
        denw,
        rows.entropy,
        rows.label_logprob,
        *grad_coefficients(rows),
    )
    return tuple(blocks_to_rows(plan, o).reshape(batch) for o in out)


def local_backward(
    call: Call,
    x,
    w,
    bias,
    nondiff: NonDiffInputs,
    lse,
    prob_coef,
    label_coef,
    smooth_coef,
    cotangent,
):
    """Recomputes every tile once and returns the gradients of ``sum(cotangent * loss)``."""
    plan = call.plan
    inputs = _prepare(call, x, w, bias, nondiff)
    n = plan.n
    to_blocks = lambda r: rows_to_blocks(plan, r.reshape(n).astype(plan.cdtype), 0)
    g = to_blocks(cotangent)
    dx4, dw4, db3 = grad_pass(
        plan,
        inputs,
        to_blocks(lse),
        g * to_blocks(prob_coef),
        g * to_blocks(label_coef),
        g * to_blocks(smooth_coef),
        True,
        True,
    )
    return _finish_grads(call, x, w, bias, dx4, dw4, db3)


def _finish_grads(call: Call, x, w, bias, dx4, dw4, db3):
    """Gradients back in the layout and dtype of ``x``, ``w`` and ``bias``, summed over the
    mesh axes that hold other parts of them."""
    plan = call.plan
    dx = x_unview(plan, dx4).reshape(x.shape)
    dw = w_unview(plan, dw4)
    db = None if db3 is None else bias_unview(plan, db3)
    if call.vocab_axes:
        dx = lax.psum(dx, call.vocab_axes)
    if call.data_axes:
        dw = lax.psum(dw, call.data_axes)
        db = None if db is None else lax.psum(db, call.data_axes)
    return (
        dx.astype(x.dtype),
        dw.astype(w.dtype),
        None if db is None else db.astype(bias.dtype),
    )


def _rows_with_a_class(call: Call, bias, nondiff: NonDiffInputs, n: int):
    """Whether each row has an available class, known before any logit (finite x and w)."""
    plan = call.plan
    avail = None if bias is None else bias != -jnp.inf
    if nondiff.class_mask is not None:
        class_mask = nondiff.class_mask.reshape(-1, plan.v)
        if avail is not None:
            class_mask = class_mask & avail[None, :]
        count = jnp.sum(class_mask, axis=-1, dtype=jnp.int32)
    elif avail is not None:
        count = jnp.sum(avail, dtype=jnp.int32)[None]
    else:
        return jnp.ones((n,), jnp.bool_) if plan.v_global else jnp.zeros((n,), jnp.bool_)
    if call.vocab_axes:
        count = lax.psum(count, call.vocab_axes)
    return jnp.broadcast_to(count > 0, (n,))


def local_reduced_primal(call: Call, x, w, bias, nondiff: NonDiffInputs):
    """Loss value only (no gradients): the stats pass, then the reduction."""
    loss, lse, arg, valid, denw, entropy, label_logprob, *_ = local_forward(
        call, x, w, bias, nondiff
    )
    total, den = jnp.sum(loss), jnp.sum(denw)
    if call.data_axes:
        total, den = lax.psum((total, den), call.data_axes)
    return _reduce_total(call, total, den), lse, arg, valid, denw, entropy, label_logprob


def safe_divide(numerator, den):
    """``numerator / den``, or 0 where ``den`` is exactly 0 (a mean over nothing)."""
    # The inner where keeps 0 / 0 (and its NaN gradient) out when no token counts.
    return jnp.where(den != 0, numerator / jnp.where(den != 0, den, 1), 0)


def _reduce_total(call: Call, total, den):
    """The reduced loss from the summed loss and the summed denominator weights."""
    if call.reduction == "sum":
        return total
    return safe_divide(total, den)


def local_reduced_fwd(call: Call, x, w, bias, nondiff: NonDiffInputs):
    """Strip schedule: the loss and its gradients in one pass over the token blocks."""
    plan = call.plan
    n = plan.n
    batch = x.shape[:-1]
    inputs = _prepare(call, x, w, bias, nondiff)
    scale = jnp.ones((), plan.cdtype)
    if call.reduction == "mean":
        # The mean's denominator is known before any logit, so the gradients can be scaled by
        # it inside the one pass.
        has_class = _rows_with_a_class(call, bias, nondiff, n)
        valid_pre = rows_to_blocks(plan, has_class, False) & inputs.keep
        den_pre = jnp.sum(mean_weights(plan, inputs, valid_pre))
        if call.data_axes:
            den_pre = lax.psum(den_pre, call.data_axes)
        scale = safe_divide(1, den_pre)
    row_scale = jnp.broadcast_to(scale, (plan.kn, plan.bn))
    out, (dx4, dw4, db3) = strip_pass(plan, inputs, row_scale, True, True)
    loss, lse, valid, arg, entropy, label_logprob = out
    denw = mean_weights(plan, inputs, valid)
    total, den = jnp.sum(loss), jnp.sum(denw)
    if call.data_axes:
        total, den = lax.psum((total, den), call.data_axes)
    per_row = (lse, arg, valid, denw, entropy, label_logprob)
    rows = tuple(blocks_to_rows(plan, o).reshape(batch) for o in per_row)
    grads = _finish_grads(call, x, w, bias, dx4, dw4, db3)
    return (_reduce_total(call, total, den), *rows), grads
