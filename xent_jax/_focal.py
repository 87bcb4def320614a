"""Softmax focal loss (dense and integer labels) and the PolyLoss-1 cross-entropy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from xent_jax import _validation as v
from xent_jax._labels import prepare_integer_labels
from xent_jax._logits import (
    combine_masks,
    masked_logsumexp,
    pick_labels,
    prepare_logits,
    smooth_targets,
)
from xent_jax._numerics import safe_power
from xent_jax._reduction import reduce_loss


def _focal_weights(log_probs: jax.Array, gamma: float) -> jax.Array:
    v.check_nonnegative("gamma", gamma)
    # 1 - p from -expm1(log p): no cancellation when p is close to 1 (confident predictions).
    return safe_power(-jnp.expm1(log_probs), gamma)


def _alpha(alpha: ArrayLike | None, num_classes: int, dtype) -> jax.Array | None:
    if alpha is None:
        return None
    alpha = v.as_float_array("alpha", alpha)
    if alpha.ndim not in (0, 1) or (alpha.ndim == 1 and alpha.shape != (num_classes,)):
        raise ValueError(
            f"alpha must be a scalar or have shape ({num_classes},) (one per class), got "
            f"{alpha.shape}."
        )
    return alpha.astype(dtype)


def softmax_focal_loss(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    axis: int = -1,
    alpha: ArrayLike | None = None,
    gamma: float = 2.0,
    where: ArrayLike | None = None,
    reduction: v.Reduction = "none",
) -> jax.Array:
    r"""Softmax focal loss (Lin et al., 2017) with dense labels.

    .. math::
        \ell = -\sum_c \alpha_c\, y_c\, (1 - p_c)^\gamma \log p_c,
        \qquad p = \operatorname{softmax}(z)

    :math:`\log p` comes from a log-softmax and :math:`1 - p = -\operatorname{expm1}(\log p)`,
    so confident predictions (:math:`p \to 1`) keep their digits and a finite gradient.

    Args:
      logits: ``[..., K, ...]`` logits with the class axis at ``axis``.
      labels: same shape as ``logits``.
      axis: the class axis.
      alpha: ``None``, a scalar, or ``[K]`` per-class weights.
      gamma: focusing parameter :math:`\gamma \ge 0`; 0 gives the cross-entropy.
      where: class mask (logits' rank) or example mask (lower rank), as in
        :func:`softmax_cross_entropy`.
      reduction: ``"none"``, ``"sum"`` or ``"mean"`` over valid examples.

    Returns:
      The loss in float32 (float64 for float64 logits).

    Examples:
      >>> import jax.numpy as jnp
      >>> import xent_jax
      >>> xent_jax.softmax_focal_loss(jnp.array([[2.0, 1.0, 0.1]]), jnp.array([[1.0, 0.0, 0.0]]))
      Array([0.048492], dtype=float32)
    """
    prepared = prepare_logits(logits, axis=axis, where=where, logit_softcap=None)
    z = prepared.logits
    targets = v.as_float_array("labels", labels)
    v.check_same_shape("logits", jnp.asarray(logits), "labels", targets)
    targets = jnp.moveaxis(targets.astype(z.dtype), prepared.axis, -1)
    if prepared.class_mask is not None:
        targets = jnp.where(prepared.class_mask, targets, 0)  # masked classes carry no target
    lse, row_valid = masked_logsumexp(z)
    # Double where: a fully masked row computes on log p = 0, so its -inf never meets a weight
    # that depends on the logits (0 * -inf = NaN in the gradient).
    log_probs = jnp.where(row_valid[..., None], z - lse[..., None], 0)
    weights = targets * _focal_weights(log_probs, gamma)
    alpha = _alpha(alpha, z.shape[-1], z.dtype)
    if alpha is not None:
        weights = weights * alpha
    # Double where: weights depend on the logits too, so a -inf log p must not even reach the
    # product (0 * -inf would be NaN in its gradient); classes without mass contribute 0. Only
    # the -inf is replaced: a finite log p keeps the loss's derivative in a zero target.
    log_probs = jnp.where((weights == 0) & (log_probs == -jnp.inf), 0, log_probs)
    loss = -jnp.sum(weights * log_probs, axis=-1)
    valid = combine_masks(prepared.example_mask, row_valid)
    loss = jnp.where(valid, loss, 0)
    return reduce_loss(loss, reduction, denominator_weights=valid)


def softmax_focal_loss_with_integer_labels(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    axis: int = -1,
    alpha: ArrayLike | None = None,
    gamma: float = 2.0,
    where: ArrayLike | None = None,
    ignore_index: int | None = None,
    reduction: v.Reduction = "none",
) -> jax.Array:
    r"""Softmax focal loss with integer labels: :math:`-\alpha_y (1 - p_y)^\gamma \log p_y`.

    Args:
      logits: ``[..., K, ...]`` logits with the class axis at ``axis``.
      labels: integer labels with the shape of ``logits`` without ``axis``. Out-of-range labels
        (other than ``ignore_index``) give NaN for that example.
      axis: the class axis.
      alpha: ``None``, a scalar, or ``[K]`` per-class weights.
      gamma: focusing parameter :math:`\gamma \ge 0`.
      where: class mask (logits' rank) or example mask (lower rank).
      ignore_index: label value of examples to skip.
      reduction: ``"none"``, ``"sum"`` or ``"mean"`` over valid examples.

    Returns:
      The loss in float32 (float64 for float64 logits).

    Examples:
      >>> import jax.numpy as jnp
      >>> import xent_jax
      >>> xent_jax.softmax_focal_loss_with_integer_labels(
      ...     jnp.array([[2.0, 1.0, 0.1]]), jnp.array([0]), gamma=2.0)
      Array([0.048492], dtype=float32)
    """
    prepared = prepare_logits(logits, axis=axis, where=where, logit_softcap=None)
    z = prepared.logits
    integer_labels = prepare_integer_labels(
        labels, batch_shape=z.shape[:-1], num_classes=z.shape[-1], ignore_index=ignore_index
    )
    lse, row_valid = masked_logsumexp(z)
    label_logits = pick_labels(z, integer_labels.safe)
    # Double where: a fully masked row computes on log p = 0 (see softmax_focal_loss).
    log_p = jnp.where(row_valid, label_logits - lse, 0)
    loss = -_focal_weights(log_p, gamma) * log_p
    alpha = _alpha(alpha, z.shape[-1], z.dtype)
    if alpha is not None:
        loss = loss * (alpha if alpha.ndim == 0 else alpha[integer_labels.safe])
    # Loud, never silently wrong: an invalid label (not ignored) makes its example NaN.
    loss = jnp.where(integer_labels.invalid, jnp.nan, loss)
    valid = combine_masks(prepared.example_mask, row_valid, integer_labels.kept)
    loss = jnp.where(valid, loss, 0)
    return reduce_loss(loss, reduction, denominator_weights=valid)


def poly_loss_cross_entropy(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    epsilon: float = 2.0,
    axis: int = -1,
    where: ArrayLike | None = None,
    label_smoothing: float = 0.0,
    reduction: v.Reduction = "none",
) -> jax.Array:
    r"""PolyLoss-1 (Leng et al., 2022): cross-entropy plus a weighted first polynomial term.

    .. math::
        \ell = -\sum_c t_c \log p_c + \epsilon \sum_c t_c (1 - p_c),
        \qquad t = (1 - \varepsilon_{ls})\, y + \varepsilon_{ls} / K

    Equal to ``optax.poly_loss_cross_entropy`` without smoothing.

    Args:
      logits: ``[..., K, ...]`` logits with the class axis at ``axis``.
      labels: dense labels, same shape as ``logits``.
      epsilon: coefficient of the polynomial term (may be negative, as in the paper).
      axis: the class axis.
      where: class mask (logits' rank) or example mask (lower rank).
      label_smoothing: smoothing applied to the labels before both terms.
      reduction: ``"none"``, ``"sum"`` or ``"mean"`` over valid examples.

    Returns:
      The loss in float32 (float64 for float64 logits).

    Examples:
      >>> import jax.numpy as jnp
      >>> import xent_jax
      >>> xent_jax.poly_loss_cross_entropy(jnp.array([[2.0, 1.0, 0.1]]),
      ...                                  jnp.array([[1.0, 0.0, 0.0]]), epsilon=2.0)
      Array([1.099027], dtype=float32)
    """
    prepared = prepare_logits(logits, axis=axis, where=where, logit_softcap=None)
    z = prepared.logits
    targets = v.as_float_array("labels", labels)
    v.check_same_shape("logits", jnp.asarray(logits), "labels", targets)
    v.check_label_smoothing(label_smoothing)
    targets = jnp.moveaxis(targets.astype(z.dtype), prepared.axis, -1)
    if prepared.class_mask is not None:
        # A masked class leaves the softmax and the target sum alike (optax's convention).
        targets = jnp.where(prepared.class_mask, targets, 0)
    targets = smooth_targets(targets, z, label_smoothing)
    lse, row_valid = masked_logsumexp(z)
    log_probs = z - lse[..., None]
    # 0 * log 0 = 0: classes without target mass never contribute, even at a -inf logit. Only
    # the -inf factor is replaced, so a zero target keeps its derivative -log p.
    unweighted_log_zero = (targets == 0) & (log_probs == -jnp.inf)
    cross_entropy = -jnp.sum(targets * jnp.where(unweighted_log_zero, 0, log_probs), axis=-1)
    one_minus_p_t = jnp.sum(targets * (1 - jnp.exp(log_probs)), axis=-1)
    loss = cross_entropy + epsilon * one_minus_p_t
    valid = combine_masks(prepared.example_mask, row_valid)
    loss = jnp.where(valid, loss, 0)
    return reduce_loss(loss, reduction, denominator_weights=valid)
