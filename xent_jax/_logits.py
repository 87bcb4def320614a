"""Shared preparation of logits for the softmax family: layout, dtype, soft-capping, masks and a
log-softmax that survives ``-inf`` logits and fully masked rows."""

from __future__ import annotations

import math
from typing import NamedTuple, overload

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from xent_jax import _validation as v
from xent_jax._mesh import is_explicitly_sharded


class PreparedLogits(NamedTuple):
    """Logits ready for a softmax loss.

    Attributes:
      logits: ``[..., K]`` in the compute dtype, class axis last, soft-capped, masked classes set
        to ``-inf``.
      example_mask: ``[...]`` boolean, or ``None`` when every example is kept.
      class_mask: ``[..., K]`` boolean (class axis last), or ``None`` without a class mask.
      axis: the class axis of the caller's layout (non-negative).
    """

    logits: jax.Array
    example_mask: jax.Array | None
    class_mask: jax.Array | None
    axis: int


def soft_cap(logits: jax.Array, cap: float | None) -> jax.Array:
    """``cap * tanh(logits / cap)``; ``-inf`` logits stay ``-inf`` so masked entries stay masked."""
    if cap is None:
        return logits
    capped = cap * jnp.tanh(logits / cap)
    return jnp.where(logits == -jnp.inf, logits, capped)


def split_where(
    where: ArrayLike | None, logits_shape: tuple[int, ...], axis: int
) -> tuple[jax.Array | None, jax.Array | None]:
    """Splits ``where`` into (class mask in the caller's layout, example mask of the batch shape).

    A mask with the logits' rank masks classes; a mask of lower rank masks whole examples.
    """
    mask = v.as_mask("where", where)
    if mask is None:
        return None, None
    batch_shape = logits_shape[:axis] + logits_shape[axis + 1 :]
    if mask.ndim == len(logits_shape):
        v.check_broadcastable("where", mask, logits_shape, "logits")
        return jnp.broadcast_to(mask, logits_shape), None
    v.check_broadcastable("where", mask, batch_shape, "the batch (logits without axis)")
    return None, jnp.broadcast_to(mask, batch_shape)


@overload
def collapse_class_axes(
    logits: jax.Array, axes: tuple[int, ...], where: ArrayLike | None, targets: jax.Array
) -> tuple[jax.Array, jax.Array | None, jax.Array]: ...
@overload
def collapse_class_axes(
    logits: jax.Array, axes: tuple[int, ...], where: ArrayLike | None, targets: None = None
) -> tuple[jax.Array, jax.Array | None, None]: ...
def collapse_class_axes(
    logits: jax.Array,
    axes: tuple[int, ...],
    where: ArrayLike | None,
    targets: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    """Moves the class ``axes`` (normalised, in the caller's order) to the end and flattens them
    into one class axis, as optax does for a tuple ``axis``; a class-rank ``where`` and dense
    ``targets`` are laid out the same way. An integer label is then a flat index into the
    class block (``jnp.ravel_multi_index`` over the class axes' sizes)."""
    batch_axes = tuple(a for a in range(logits.ndim) if a not in axes)
    order = batch_axes + axes
    batch_shape = tuple(logits.shape[a] for a in batch_axes)
    num_classes = math.prod(logits.shape[a] for a in axes)

    def collapse(array):
        return jnp.transpose(array, order).reshape(*batch_shape, num_classes)

    mask = v.as_mask("where", where)
    if mask is not None and mask.ndim == logits.ndim:
        v.check_broadcastable("where", mask, logits.shape, "logits")
        mask = collapse(jnp.broadcast_to(mask, logits.shape))
    return collapse(logits), mask, None if targets is None else collapse(targets)


def prepare_logits(
    logits: ArrayLike,
    *,
    axis: int,
    where: ArrayLike | None,
    logit_softcap: float | None,
) -> PreparedLogits:
    logits = v.as_float_array("logits", logits)
    if logits.ndim == 0:
        raise ValueError("logits must have at least one dimension (the class axis), got a scalar.")
    axis = v.normalize_axis(axis, logits.ndim)
    class_mask, example_mask = split_where(where, logits.shape, axis)
    z = logits.astype(v.compute_dtype(logits.dtype))
    if class_mask is not None:
        z = jnp.where(class_mask, z, -jnp.inf)
    if axis != logits.ndim - 1:
        z = jnp.moveaxis(z, axis, -1)
        class_mask = None if class_mask is None else jnp.moveaxis(class_mask, axis, -1)
    if example_mask is not None:
        # Double where: masked examples compute on zeros, so NaNs there cannot reach gradients.
        z = jnp.where(example_mask[..., None], z, 0)
    # After the masks: a NaN hidden by either never reaches the tanh (whose NaN derivative
    # would reach the gradient of the masked logit).
    z = soft_cap(z, logit_softcap)
    return PreparedLogits(z, example_mask, class_mask, axis)


class LogSumExp(NamedTuple):
    """``lse`` is ``[...]``; ``row_valid`` is False where every class is masked (``lse`` is 0)."""

    lse: jax.Array
    row_valid: jax.Array


def masked_logsumexp(z: jax.Array) -> LogSumExp:
    """logsumexp over the last axis that treats an all ``-inf`` row as masked instead of NaN."""
    row_max = jnp.max(z, axis=-1, keepdims=True)
    row_valid = row_max[..., 0] != -jnp.inf
    # The shift cancels in the gradient; stopping it saves a pass and keeps -inf rows finite.
    shift = jax.lax.stop_gradient(jnp.where(row_max == -jnp.inf, 0, row_max))
    sum_exp = jnp.sum(jnp.exp(z - shift), axis=-1)
    # Double where: a fully masked row takes log(1) = 0 instead of log(0) = -inf.
    safe_sum = jnp.where(row_valid, sum_exp, 1)
    return LogSumExp(jnp.log(safe_sum) + shift[..., 0], row_valid)


def pick_labels(values: jax.Array, labels: jax.Array) -> jax.Array:
    """``values[..., label]`` along the last axis.

    JAX's sharding-in-types refuses a gather along a class axis that is sharded over an explicit
    mesh; there a masked sum takes its place, which each device reduces over its own classes.
    """
    if is_explicitly_sharded(values):
        iota = jax.lax.broadcasted_iota(labels.dtype, values.shape, values.ndim - 1)
        return jnp.sum(jnp.where(iota == labels[..., None], values, 0), axis=-1)
    return jnp.take_along_axis(values, labels[..., None], axis=-1)[..., 0]


def available_classes(z: jax.Array) -> jax.Array:
    """Classes that can receive probability: neither masked by ``where`` nor at ``-inf``."""
    return z != -jnp.inf


@overload
def combine_masks(
    first: jax.Array | None, second: jax.Array, /, *rest: jax.Array | None
) -> jax.Array: ...
@overload
def combine_masks(first: jax.Array, /, *rest: jax.Array | None) -> jax.Array: ...
@overload
def combine_masks(*masks: jax.Array | None) -> jax.Array | None: ...
def combine_masks(*masks: jax.Array | None) -> jax.Array | None:
    """The conjunction of the masks that are present (``None`` when none is): an array as
    soon as one of the first two is."""
    present = [m for m in masks if m is not None]
    if not present:
        return None
    combined = present[0]
    for mask in present[1:]:
        combined = combined & mask
    return combined


def smoothing_is_on(label_smoothing) -> bool:
    """Whether the smoothing code path is needed (a traced value always takes it)."""
    return v.is_traced(label_smoothing) or float(label_smoothing) != 0.0


def smooth_targets(targets: jax.Array, z: jax.Array, label_smoothing) -> jax.Array:
    """``(1 - ε) t + ε / K`` where ``K`` counts the classes of the row that can take mass."""
    if not smoothing_is_on(label_smoothing):
        return targets
    available = available_classes(z)
    num_available = jnp.maximum(jnp.sum(available, axis=-1, keepdims=True), 1)
    # Smoothing mass goes only to classes that can receive probability (optax leaks it).
    uniform = jnp.where(available, 1.0 / num_available, 0.0).astype(z.dtype)
    return (1.0 - label_smoothing) * targets + label_smoothing * uniform
