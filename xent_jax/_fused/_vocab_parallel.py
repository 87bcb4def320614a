"""Vocab-parallel and data-parallel cross-entropy of logits split over a mesh.

The logits are one tile per device: inside :func:`jax.shard_map` each device reduces its own
block of classes with the fused loss's tile arithmetic (max and sum of exponentials, combined
by ``pmax`` / ``psum``; the label's logit comes from the shard that owns it), and each device
handles its own tokens. How the mesh is found is :mod:`xent_jax._mesh`'s business.

Nothing of size ``N x V`` is ever gathered: the only collectives move per-token vectors, the
``[N, D]`` gradient of the input (summed over the vocabulary shards) and, with data
parallelism, the ``[D, V]`` gradient of the weights (summed over the token shards).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike

from xent_jax import _validation as v
from xent_jax._fused._blocks import Plan, pad_class_mask, split_where_blocked
from xent_jax._fused._custom_vjp import partition_specs, shard_mapped
from xent_jax._fused._local import Call, mean_weights, nondiff_inputs, prepare_rows
from xent_jax._fused._tile_math import (
    Stats,
    combine_stats,
    finish_rows,
    init_stats,
    tile_grad,
    tile_mask,
    transform_logits,
    update_stats,
)
from xent_jax._mesh import Layout, local_sizes, resolve_layout, spec_entry, vocab_padding
from xent_jax._options import SoftmaxOptions, softmax_options
from xent_jax._reduction import reduce_loss

# ----------------------------------------------------------------------------------------------
# Integer-label softmax cross-entropy on logits sharded along the class axis
# ----------------------------------------------------------------------------------------------


def _logits_call(
    layout: Layout, batch_shape, num_classes: int, options, masks, cdtype, pad: int
) -> Call:
    """The static description of a call on logits whose classes (``num_classes`` and ``pad``
    padding columns) are split over the mesh."""
    _, n, v_local = local_sizes(layout, batch_shape, num_classes + pad)
    _, example_mask, cmask_kind = masks
    plan = Plan(
        smoothing=options.smoothing,
        has_z_loss=options.z_loss is not None,
        softcap=options.scaled_softcap,
        has_bias=False,
        has_cw=options.class_weights is not None,
        cmask=cmask_kind,
        has_example_mask=example_mask is not None,
        ignore_index=options.ignore_index,
        aux=False,
        cdtype=cdtype,
        n=n,
        pn=1,
        kn=1,
        bc=n,
        v=v_local,
        pv=1,
        kv=1,
        tc=v_local,
        v_global=num_classes,
        vocab_axes=layout.vocab_axes or None,
        data_axes=layout.data_axes or None,
    )
    return Call(
        plan=plan,
        reduction="none",
        mesh=layout.mesh,
        batch_spec=layout.batch_spec,
        data_axes=layout.data_axes,
        vocab_axes=layout.vocab_axes,
    )


def _local_logits(call, z, nondiff):
    """Shared by the forward and backward passes: stats of the local block of classes."""
    plan = call.plan
    inputs = prepare_rows(call, nondiff, None)
    raw_logits = z.reshape(plan.n, plan.v).astype(plan.cdtype)
    mask = tile_mask(plan, inputs, 0, 0)
    logits, masked_logits = transform_logits(plan, inputs, raw_logits, 0, mask)
    return plan, inputs, logits, masked_logits, mask


def _local_logits_forward(call, z, nondiff):
    plan, inputs, _, masked_logits, _ = _local_logits(call, z, nondiff)
    stats = init_stats(plan)
    rows = update_stats(
        plan,
        tuple(field[0] for field in stats),
        masked_logits,
        inputs.labels[0],
        inputs.cls[0],
        None if inputs.cw is None else inputs.cw[0],
    )
    stats = combine_stats(plan, Stats(*(field[None] for field in rows)))
    rows = finish_rows(plan, inputs, stats)
    ok = rows.grad_ok
    out = (
        rows.loss,
        rows.lse,
        rows.valid,
        mean_weights(plan, inputs, rows.valid),
        jnp.where(ok, rows.prob_coef, 0),
        jnp.where(ok, rows.label_coef, 0),
        jnp.where(ok, rows.smooth_coef, 0),
    )
    batch = z.shape[:-1]
    return tuple(o.reshape(batch) for o in out)


def _local_logits_tangent(call, z, nondiff, lse, prob_coef, label_coef, smooth_coef, dz):
    """Tangents of the per-row loss and logsumexp: ``sum_c dL/dz_c dz_c`` and
    ``sum_c dlse/dz_c dz_c``, reduced over the local classes and summed over the shards."""
    plan, inputs, logits, masked_logits, mask = _local_logits(call, z, nondiff)
    flat = lambda r: r.reshape(plan.n).astype(plan.cdtype)
    cw = None if inputs.cw is None else inputs.cw[0]
    labels, classes = inputs.labels[0], inputs.cls[0]
    grad = lambda prob, label, smooth: tile_grad(
        plan, logits, masked_logits, mask, flat(lse), prob, label, smooth, labels, classes, cw
    )
    dzf = dz.reshape(plan.n, plan.v).astype(plan.cdtype)
    coefs = (flat(prob_coef), flat(label_coef), flat(smooth_coef))
    d_loss = jnp.sum(grad(*coefs) * dzf, axis=-1)
    # dlse/dz is the gradient with coefficients (1, 0, 0), on the rows that have a gradient:
    # a row without one (ignored, masked, a +inf logit) stays exactly 0.
    live = ((coefs[0] != 0) | (coefs[1] != 0) | (coefs[2] != 0)).astype(plan.cdtype)
    zeros = jnp.zeros_like(live)
    d_lse = jnp.sum(grad(live, zeros, zeros) * dzf, axis=-1)
    if call.vocab_axes:
        d_loss, d_lse = lax.psum((d_loss, d_lse), call.vocab_axes)
    batch = z.shape[:-1]
    return d_loss.reshape(batch), d_lse.reshape(batch)


def _logits_specs(call, nondiff):
    specs = partition_specs(call, nondiff)
    return P(*call.batch_spec, spec_entry(call.vocab_axes)), specs


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _logits_rows(call, z, nondiff):
    """Per-row (loss, lse, valid, mean weights, and the three gradient coefficients).

    A custom JVP rather than a VJP: its rule is a linear ``shard_map`` in the tangent, which
    ``jax.grad`` transposes, and which calls this function again, so ``jax.jvp``,
    ``jax.jacfwd`` and ``jax.hessian`` work on sharded logits too (the ``pmax`` of the row
    maximum is never differentiated).
    """
    zspec, specs = _logits_specs(call, nondiff)
    in_specs = (zspec, specs["nondiff"])
    fn = shard_mapped(call, _local_logits_forward, in_specs, (specs["rows"],) * 7)
    return fn(z, nondiff)


@_logits_rows.defjvp
def _logits_rows_jvp(call, primals, tangents):
    z, nondiff = primals
    dz, _ = tangents
    rows = _logits_rows(call, z, nondiff)
    loss, lse, valid, _, prob_coef, label_coef, smooth_coef = rows
    zspec, specs = _logits_specs(call, nondiff)
    in_specs = (zspec, specs["nondiff"]) + (specs["rows"],) * 4 + (zspec,)
    fn = shard_mapped(call, _local_logits_tangent, in_specs, (specs["rows"],) * 2)
    d_loss, d_lse = fn(z, nondiff, lse, prob_coef, label_coef, smooth_coef, dz)
    zeros = jnp.zeros_like(loss)
    # Only the z-loss term of the probability coefficient depends on the logits.
    d_prob = zeros if nondiff.z_loss is None else 2 * nondiff.z_loss * d_lse
    d_prob = jnp.where(prob_coef != 0, d_prob, 0)
    d_valid = np.zeros(valid.shape, jax.dtypes.float0)
    return rows, (d_loss, d_lse, d_valid, zeros, d_prob.astype(loss.dtype), zeros, zeros)


def vocab_parallel_softmax_cross_entropy_with_integer_labels(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    axis: int = -1,
    where: ArrayLike | None = None,
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    class_weights: ArrayLike | None = None,
    z_loss: float = 0.0,
    logit_softcap: float | None = None,
    temperature: float = 1.0,
    reduction: v.Reduction = "none",
    mesh: Any = None,
    vocab_axis: str | tuple[str, ...] | None = None,
    batch_axis: str | tuple[str, ...] | None = None,
) -> jax.Array:
    r"""Integer-label softmax cross-entropy of logits split along the class axis over a mesh.

    The same numbers and gradients as
    :func:`xent_jax.softmax_cross_entropy_with_integer_labels` (same options, same formula)

    .. math::
        \ell = (1 - \varepsilon)\, w_y \big(\operatorname{lse}(z) - z_y\big)
               + \frac{\varepsilon}{K} \sum_c w_c \big(\operatorname{lse}(z) - z_c\big)
               + \lambda_z \operatorname{lse}(z)^2,

    computed inside :func:`jax.shard_map`: each device reduces its own block of classes (row
    max combined by ``pmax``, sums of exponentials and the smoothing sums by ``psum``), the
    label's logit comes from the device that owns that class, and the gradient of each block
    of logits stays on its device. Nothing of the size of the logits is ever gathered.

    ``softmax_cross_entropy_with_integer_labels`` calls this by itself when the logits carry an
    explicit sharding along the class axis; call it directly to name the mesh axes of logits on
    a mesh with automatic axes.

    Args:
      logits: ``[..., K, ...]`` logits, class axis ``axis``, split over mesh axes along it.
      labels: integer labels, the shape of ``logits`` without ``axis``.
      axis: the class axis.
      where: as in :func:`xent_jax.softmax_cross_entropy_with_integer_labels`.
      ignore_index: label value of examples to ignore.
      label_smoothing: :math:`\varepsilon \in [0, 1)`.
      class_weights: ``[K]`` weight per class.
      z_loss: coefficient of the squared log-normaliser.
      logit_softcap: soft cap :math:`s`: logits become :math:`s \tanh(z / s)` first.
      temperature: :math:`T > 0`: the softmax sees the (soft-capped) logits divided by :math:`T`.
      reduction: ``"none"``, ``"sum"`` or ``"mean"``.
      mesh: the mesh (default: read from the logits' sharding, or the current mesh).
      vocab_axis: mesh axes the classes are split over (default: from the logits' sharding).
      batch_axis: mesh axes the first batch dimension is split over (default: from the logits'
        sharding).

    Returns:
      The loss, float32 (float64 for float64 logits).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import xent_jax
      >>> mesh = jax.make_mesh((1,), ("model",), devices=jax.devices()[:1])
      >>> logits = jnp.array([[2.0, 1.0, 0.1, -1.0], [0.5, 2.5, 0.0, 0.3]])
      >>> labels = jnp.array([0, 1])
      >>> xent_jax.vocab_parallel_softmax_cross_entropy_with_integer_labels(
      ...     logits, labels, mesh=mesh, vocab_axis="model")
      Array([0.44931..., 0.28384...], dtype=float32)
      >>> xent_jax.softmax_cross_entropy_with_integer_labels(logits, labels)
      Array([0.44931..., 0.28384...], dtype=float32)
    """
    logits = v.as_logits(logits)
    axis = v.normalize_axis(axis, logits.ndim)
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
    return vocab_parallel_integer_loss(
        logits,
        labels,
        axis=axis,
        where=where,
        options=options,
        mesh=mesh,
        vocab_axis=vocab_axis,
        batch_axis=batch_axis,
    )


def vocab_parallel_integer_loss(
    logits: jax.Array,
    labels: ArrayLike,
    *,
    axis: int,
    where: ArrayLike | None,
    options: SoftmaxOptions,
    mesh: Any = None,
    vocab_axis=None,
    batch_axis=None,
) -> jax.Array:
    """The vocab-parallel loss on checked logits (``axis`` an int) and validated options."""
    num_classes = logits.shape[axis]
    batch_shape = logits.shape[:axis] + logits.shape[axis + 1 :]
    labels = v.as_integer_labels(labels)
    if labels.shape != batch_shape:
        raise ValueError(
            "labels must have the shape of logits without the class axis: expected "
            f"{batch_shape}, got labels.shape={labels.shape}."
        )
    mask = v.as_mask("where", where)
    if mask is not None and mask.ndim == logits.ndim:
        v.check_broadcastable("where", mask, logits.shape, "logits")
        mask = jnp.moveaxis(jnp.broadcast_to(mask, logits.shape), axis, -1)
    z = jnp.moveaxis(logits, axis, -1)
    if options.scale is not None:
        z = z * options.scale  # a temperature scales the logits (and the cap, in the plan)
    masks = split_where_blocked(mask, batch_shape, num_classes)
    cdtype = np.dtype(v.compute_dtype(z.dtype))
    if math.prod(batch_shape) == 0:
        return reduce_loss(jnp.zeros(batch_shape, cdtype), options.reduction)
    layout = resolve_layout(
        z, z, z.ndim - 1, mesh=mesh, vocab_axis=vocab_axis, batch_axis=batch_axis
    )
    if layout.mesh is None:
        raise ValueError(
            "the logits carry no explicit sharding: pass mesh= and vocab_axis= (and batch_axis=)"
        )
    pad = vocab_padding(layout, num_classes)
    if pad:
        # The mesh does not divide the classes: -inf columns, which take no probability or
        # smoothing mass and match no label (pad's gradient slices them off again).
        z = jnp.pad(z, [(0, 0)] * (z.ndim - 1) + [(0, pad)], constant_values=-jnp.inf)
        class_mask, example_mask, kind = masks
        if class_mask is not None:
            class_mask, kind = pad_class_mask(class_mask, kind, num_classes, pad)
        if options.class_weights is not None:
            padded_weights = jnp.pad(options.class_weights, (0, pad))
            options = dataclasses.replace(options, class_weights=padded_weights)
        masks = (class_mask, example_mask, kind)
    call = _logits_call(layout, batch_shape, num_classes, options, masks, cdtype, pad)
    class_mask, example_mask, _ = masks
    nondiff = nondiff_inputs(labels, example_mask, class_mask, options)
    loss, _, _, denw, *_ = _logits_rows(call, z, nondiff)
    return reduce_loss(loss, options.reduction, denominator_weights=denw)
