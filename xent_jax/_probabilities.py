"""Cross-entropy from probabilities, with Keras's ``from_logits=False`` semantics.

Prefer the logits versions: clipping to ``[eps, 1 - eps]`` bounds the loss at ``-log(eps)`` and
zeroes the gradient of any clipped probability. These exist so that numbers computed with Keras
(or from a model that only exposes probabilities) can be reproduced exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from xent_jax import _validation as v
from xent_jax._labels import prepare_integer_labels
from xent_jax._logits import combine_masks, pick_labels
from xent_jax._numerics import xlogy
from xent_jax._reduction import reduce_loss


def _check_eps(eps: float) -> None:
    if not v.is_traced(eps) and not 0.0 <= float(eps) < 0.5:
        raise ValueError(f"eps must be in [0, 0.5), got {eps!r}.")


def _as_probs(probs: ArrayLike) -> jax.Array:
    probs = v.as_float_array("probs", probs)
    return probs.astype(v.compute_dtype(probs.dtype))


def _clipped(probs: jax.Array, eps) -> jax.Array:
    """``clip(probs, eps, 1 - eps)`` with derivative 1 at the bounds themselves (``jnp.clip``
    halves it there: with ``eps=0`` a probability of exactly 0 or 1 got half its gradient)."""
    return jnp.where(probs < eps, eps, jnp.where(probs > 1 - eps, 1 - eps, probs))


def _renormalized_probs(probs: jax.Array, axis: int, eps: float) -> jax.Array:
    # Keras order: renormalise along the class axis, then clip (the caller takes the log).
    return _clipped(probs / jnp.sum(probs, axis=axis, keepdims=True), eps)


def binary_cross_entropy(
    probs: ArrayLike,
    labels: ArrayLike,
    *,
    eps: float = 1e-7,
    label_smoothing: float = 0.0,
    where: ArrayLike | None = None,
    reduction: v.Reduction = "none",
) -> jax.Array:
    r"""Elementwise binary cross-entropy from probabilities (Keras ``from_logits=False``).

    .. math::
        \ell = -\big[\, y \log \hat p + (1 - y) \log (1 - \hat p) \,\big],
        \qquad \hat p = \operatorname{clip}(p, \epsilon, 1 - \epsilon)

    Keras's ``binary_crossentropy`` also averages over the last axis; that is ``reduction="mean"``
    of one row here, or ``jnp.mean(loss, axis=-1)``.

    Args:
      probs: ``[...]`` predicted probabilities of the positive class.
      labels: ``[...]`` targets in ``[0, 1]``, the shape of ``probs``.
      eps: clipping margin (Keras's ``backend.epsilon()`` is ``1e-7``).
      label_smoothing: :math:`\varepsilon`: labels become :math:`y(1-\varepsilon) + \varepsilon/2`.
      where: boolean mask broadcastable to ``probs``.
      reduction: ``"none"``, ``"sum"`` or ``"mean"`` over valid elements.

    Returns:
      The loss in float32 (float64 for float64 inputs).

    Examples:
      >>> import jax.numpy as jnp
      >>> import xent_jax
      >>> xent_jax.binary_cross_entropy(jnp.array([0.9, 0.2, 1.0]), jnp.array([1.0, 0.0, 0.0]))
      Array([ 0.10536055,  0.22314353, 15.942385  ], dtype=float32)
    """
    p = _as_probs(probs)
    y = v.as_float_array("labels", labels)
    # Same shape, as Keras insists: labels [N, 1] against probs [N, 3] is a bug.
    v.check_same_shape("probs", p, "labels", y)
    v.check_label_smoothing(label_smoothing)
    _check_eps(eps)
    y = y.astype(p.dtype)
    y = (1 - label_smoothing) * y + label_smoothing / 2
    p = _clipped(p, eps)
    # 0 - x rather than -x: a certain, correct prediction costs 0, not -0.
    loss = 0.0 - (xlogy(y, p) + xlogy(1 - y, 1 - p))
    mask = v.as_mask("where", where)
    if mask is None:
        return reduce_loss(loss, reduction)
    v.check_broadcastable("where", mask, p.shape, "probs")
    mask = jnp.broadcast_to(mask, p.shape)
    return reduce_loss(jnp.where(mask, loss, 0), reduction, denominator_weights=mask)


def categorical_cross_entropy(
    probs: ArrayLike,
    labels: ArrayLike,
    *,
    axis: int = -1,
    eps: float = 1e-7,
    label_smoothing: float = 0.0,
    where: ArrayLike | None = None,
    reduction: v.Reduction = "none",
) -> jax.Array:
    r"""Categorical cross-entropy from probabilities and dense labels (Keras semantics).

    .. math::
        \ell = -\sum_c t_c \log \operatorname{clip}\!\Big(\frac{p_c}{\sum_k p_k},
        \epsilon, 1 - \epsilon\Big), \qquad t = (1 - \varepsilon)\, y + \varepsilon / K

    Args:
      probs: ``[..., K, ...]`` predicted probabilities, class axis ``axis`` (renormalised).
      labels: same shape as ``probs`` (one-hot or soft).
      axis: the class axis.
      eps: clipping margin.
      label_smoothing: :math:`\varepsilon` (Keras's smoothing over all ``K`` classes).
      where: boolean mask. With the rank of ``probs`` it masks classes (as in
        :func:`xent_jax.softmax_cross_entropy`: they leave the renormalisation, the target sum
        and the smoothing); with a lower rank it broadcasts to the batch shape (``probs``
        without ``axis``) and masks examples.
      reduction: ``"none"``, ``"sum"`` or ``"mean"`` over valid examples.

    Returns:
      The loss in float32 (float64 for float64 inputs).

    Examples:
      >>> import jax.numpy as jnp
      >>> import xent_jax
      >>> xent_jax.categorical_cross_entropy(jnp.array([[0.775, 0.116, 0.039, 0.070]]),
      ...                                    jnp.array([[1.0, 0.0, 0.0, 0.0]]))
      Array([0.254892], dtype=float32)
    """
    p = _as_probs(probs)
    y = v.as_float_array("labels", labels)
    v.check_same_shape("probs", p, "labels", y)
    v.check_label_smoothing(label_smoothing)
    _check_eps(eps)
    axis = v.normalize_axis(axis, p.ndim, "probs")
    y = y.astype(p.dtype)
    class_mask = v.as_mask("where", where)
    uniform = label_smoothing / p.shape[axis]
    if class_mask is not None and class_mask.ndim == p.ndim:
        v.check_broadcastable("where", class_mask, p.shape, "probs")
        class_mask = jnp.broadcast_to(class_mask, p.shape)
        # Double where: masked classes hold 0 probability and 0 target, so neither their value
        # nor a NaN there reaches the loss or the gradients.
        p, y = jnp.where(class_mask, p, 0), jnp.where(class_mask, y, 0)
        count = jnp.maximum(jnp.sum(class_mask, axis=axis, keepdims=True), 1)
        uniform = jnp.where(class_mask, label_smoothing / count, 0)
        where = None
    y = (1 - label_smoothing) * y + uniform
    # xlogy: 0 log 0 = 0 where eps=0 leaves a probability at 0 (y log p would give NaN).
    loss = 0.0 - jnp.sum(xlogy(y, _renormalized_probs(p, axis, eps)), axis=axis)
    return _mask_examples(loss, where, reduction)


def sparse_categorical_cross_entropy(
    probs: ArrayLike,
    labels: ArrayLike,
    *,
    axis: int = -1,
    eps: float = 1e-7,
    ignore_index: int | None = None,
    where: ArrayLike | None = None,
    reduction: v.Reduction = "none",
) -> jax.Array:
    r"""Categorical cross-entropy from probabilities and integer labels (Keras semantics).

    .. math::
        \ell = -\log \operatorname{clip}\!\Big(\frac{p_y}{\sum_k p_k}, \epsilon, 1 - \epsilon\Big)

    Args:
      probs: ``[..., K, ...]`` predicted probabilities, class axis ``axis`` (renormalised).
      labels: integer labels with the shape of ``probs`` without ``axis``; out-of-range labels
        (other than ``ignore_index``) give NaN for that example.
      axis: the class axis.
      eps: clipping margin.
      ignore_index: label value of examples to skip (Keras's ``ignore_class``).
      where: boolean mask broadcastable to the batch shape.
      reduction: ``"none"``, ``"sum"`` or ``"mean"`` over valid examples.

    Returns:
      The loss in float32 (float64 for float64 inputs).

    Examples:
      >>> import jax.numpy as jnp
      >>> import xent_jax
      >>> xent_jax.sparse_categorical_cross_entropy(
      ...     jnp.array([[0.775, 0.116, 0.039, 0.070]]), jnp.array([0]))
      Array([0.254892], dtype=float32)
    """
    p = _as_probs(probs)
    _check_eps(eps)
    axis = v.normalize_axis(axis, p.ndim, "probs")
    log_probs = jnp.moveaxis(jnp.log(_renormalized_probs(p, axis, eps)), axis, -1)
    integer_labels = prepare_integer_labels(
        labels,
        batch_shape=log_probs.shape[:-1],
        num_classes=log_probs.shape[-1],
        ignore_index=ignore_index,
        what="probs",
    )
    loss = -pick_labels(log_probs, integer_labels.safe)
    # Loud, never silently wrong: an invalid label (not ignored) makes its example NaN.
    loss = jnp.where(integer_labels.invalid, jnp.nan, loss)
    if integer_labels.kept is not None:
        loss = jnp.where(integer_labels.kept, loss, 0)
    return _mask_examples(loss, where, reduction, kept=integer_labels.kept)


def _mask_examples(
    loss: jax.Array, where: ArrayLike | None, reduction: str, kept: jax.Array | None = None
) -> jax.Array:
    example_mask = v.as_mask("where", where)
    if example_mask is not None:
        v.check_broadcastable("where", example_mask, loss.shape, "the batch (probs without axis)")
        example_mask = jnp.broadcast_to(example_mask, loss.shape)
    valid = combine_masks(example_mask, kept)
    if valid is None:
        return reduce_loss(loss, reduction)
    return reduce_loss(jnp.where(valid, loss, 0), reduction, denominator_weights=valid)
